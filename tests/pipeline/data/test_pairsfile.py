"""The pairs' identity goes by content: the same data ingested from another folder is the same pairs
(issue 24, item 4); ``source`` keeps the path as typed, for display only."""

from __future__ import annotations

import shutil

from pipeline.core.atomic import file_sha256
from pipeline.data.pairsfile import pairs_sha256, read_pairs
from tests.conftest import write_arithmetic_pairs


def _ingest(src, out):
    from stages.ingest import IngestConfig, run

    run(IngestConfig(inputs=[str(src)], out=str(out), eval_fraction=0.25, progress=False))
    return out


def test_the_same_data_from_another_folder_has_the_same_pairs_sha256(tmp_path):
    a = write_arithmetic_pairs((tmp_path / "a").mkdir() or tmp_path / "a" / "data.jsonl", 10)
    (tmp_path / "elsewhere").mkdir()
    b = tmp_path / "elsewhere" / "data.jsonl"
    shutil.copy(a, b)
    pa_, pb = _ingest(a, tmp_path / "a.arrow"), _ingest(b, tmp_path / "b.arrow")
    ta, tb = read_pairs(pa_), read_pairs(pb)
    assert ta.column("source").to_pylist() != tb.column("source").to_pylist()  # the path as typed, kept
    assert file_sha256(pa_) != file_sha256(pb)
    assert pairs_sha256(ta) == pairs_sha256(tb)
    # ...and content still counts: one pair fewer is other pairs; so is the chunking not.
    assert pairs_sha256(ta.slice(1)) != pairs_sha256(ta)
    assert pairs_sha256(ta, rows_per_block=3) == pairs_sha256(ta, rows_per_block=3)
