"""Every reader of a reference-score cache checks what train checks (issue 24, item 3): eval the reference's
identity, query and score-ref's reuse the parts' checksums; a cache without its manifest is not reused."""

from __future__ import annotations

import json
import shutil

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.core.atomic import file_sha256
from pipeline.core.errors import UserError
from pipeline.refcache.reader import open_cache
from stages.score_ref import ScoreRefConfig
from stages.score_ref import run as score_ref

SCORE = dict(model="micro", samples=1, draws=1, pairs_per_part=4, limit=8, device="cpu", progress=False)


def _alter_part(path):
    """Rewrite a part as valid Parquet with other values (what a checksum, not a reader, catches)."""
    table = pq.read_table(path)
    i = table.column_names.index("ref_margin")
    table = table.set_column(i, "ref_margin", pc.add(table.column("ref_margin"), 1.0))
    pq.write_table(table, path)


@pytest.fixture()
def cache(small_pairs, tmp_path):
    out = tmp_path / "scores"
    score_ref(ScoreRefConfig(pairs=small_pairs, out=out, **SCORE))
    return out


def test_score_ref_rescores_an_altered_part_instead_of_reusing_it(small_pairs, cache):
    manifest = json.loads((cache / "manifest.json").read_text())
    first = cache / manifest["parts"][0]
    rows = pq.read_metadata(first).num_rows
    _alter_part(first)
    again = score_ref(ScoreRefConfig(pairs=small_pairs, out=cache, **SCORE))
    assert again.scored_now == rows  # that part only, scored again; the others' scores reused, and said so
    assert again.reused and again.reused_pairs == manifest["pairs"] - rows
    assert file_sha256(first) == manifest["part_sha256"][first.name]  # scored back to the same bytes
    assert json.loads((cache / "manifest.json").read_text())["part_sha256"] == manifest["part_sha256"]


def test_score_ref_does_not_reuse_parts_without_their_manifest(small_pairs, cache):
    (cache / "manifest.json").unlink()
    res = score_ref(ScoreRefConfig(pairs=small_pairs, out=cache, **{**SCORE, "samples": 3}))
    assert res.scored_now == 8 and not res.reused
    terms = open_cache(cache).table(["ref_chosen_terms"]).column(0).to_pylist()
    assert {len(draws[0]) for draws in terms} == {3}  # every part holds the new settings' scores


def test_query_refuses_an_altered_or_missing_part(cache):
    from stages.query import QueryConfig
    from stages.query import run as query

    assert query(QueryConfig(sql="SELECT count(*) FROM scores", scores=cache))[1] == [(8,)]
    parts = json.loads((cache / "manifest.json").read_text())["parts"]
    altered = tmp = cache.parent / "altered"
    shutil.copytree(cache, tmp)
    _alter_part(tmp / parts[0])
    with pytest.raises(UserError, match=f"{parts[0]}: part file differs from the checksum in the manifest"):
        query(QueryConfig(sql="SELECT count(*) FROM scores", scores=altered))
    (cache / parts[1]).unlink()
    with pytest.raises(UserError, match=f"part file {parts[1]} listed in the manifest is missing"):
        query(QueryConfig(sql="SELECT count(*) FROM scores", scores=cache))
    (cache / "manifest.json").unlink()
    with pytest.raises(UserError, match="no manifest.json"):
        query(QueryConfig(sql="SELECT count(*) FROM scores", scores=cache))


def test_eval_refuses_a_reference_whose_weights_changed_after_scoring(small_pairs, tmp_path):
    from safetensors.torch import load_file, save_file

    from pipeline.models.init import init_model
    from stages.evaluate import EvalConfig
    from stages.evaluate import run as evaluate

    model = tmp_path / "model"
    init_model("micro", model)
    out = tmp_path / "scores"
    score_ref(ScoreRefConfig(pairs=small_pairs, out=out, **{**SCORE, "model": str(model), "limit": 0}))
    weights = model / "model.safetensors"
    tensors = load_file(str(weights))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 0.01
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(UserError, match="is no longer the model this cache was scored with .model.weights"):
        evaluate(EvalConfig(scores=out, model=str(model), out=tmp_path / "ev", device="cpu", train_sample=0))
    assert not (tmp_path / "ev" / "eval.json").exists()


def test_eval_refuses_an_altered_part(cache, tmp_path):
    from stages.evaluate import EvalConfig
    from stages.evaluate import run as evaluate

    manifest = json.loads((cache / "manifest.json").read_text())
    for name in manifest["parts"]:
        _alter_part(cache / name)
    with pytest.raises(UserError, match="part file differs from the checksum in the manifest"):
        evaluate(EvalConfig(scores=cache, model="micro", out=tmp_path / "ev", device="cpu", train_sample=0))
