"""ScoresCache.split_rows: the split read on demand from the parts' row groups, in rows()'s order."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.schemas import SCORES_MANIFEST, SCORES_SCHEMA
from pipeline.refcache.reader import open_cache, part_name


def _row(pid: str, split: str, chosen: list[int], rejected: list[int]) -> dict:
    return {"pair_id": pid, "split": split, "prompt_ids": [1, 2], "chosen_ids": chosen, "rejected_ids": rejected,
            "prompt_len": 2, "chosen_len": len(chosen), "rejected_len": len(rejected), "truncated": False,
            "chosen_seeds": [7], "rejected_seeds": [8], "chosen_mask_counts": [[1]], "rejected_mask_counts": [[1]],
            "chosen_timesteps": [[0.5]], "rejected_timesteps": [[0.5]], "ref_chosen_terms": [[-1.0]],
            "ref_rejected_terms": [[-2.0]], "ref_chosen_elbo": -1.0, "ref_rejected_elbo": -2.0,
            "ref_margin": float(int(pid[1:]))}


def _cache(tmp_path, n=40, per_part=9, row_group=4):
    rows = [_row(f"p{(i * 7) % n:03d}", "eval" if i % 5 == 0 else "train", [3, 4 + i % 3], [3, 5])
            for i in range(n)]
    names = []
    for k in range(0, n, per_part):
        names.append(part_name(len(names)))
        pq.write_table(pa.Table.from_pylist(rows[k:k + per_part], schema=SCORES_SCHEMA), tmp_path / names[-1],
                       row_group_size=row_group)
    (tmp_path / SCORES_MANIFEST).write_text(json.dumps({"fingerprint": {}, "parts": names}))
    return open_cache(tmp_path)


def test_split_rows_equal_rows_in_order_and_read_any_row(tmp_path):
    cache = _cache(tmp_path)
    for split in ("train", "eval", None):
        full = list(cache.rows(split=split))
        sliced = cache.split_rows(split)
        assert len(sliced) == len(full) and list(sliced) == full
        assert sliced.pair_ids == [r["pair_id"] for r in full]
        picks = [len(full) - 1, 0, len(full) // 2, 0]
        assert sliced.take(picks) == [full[i] for i in picks]
        assert sliced[1:3] == full[1:3]
        assert sliced.column("ref_margin") == [r["ref_margin"] for r in full]
    assert list(cache.split_rows("train").limit(3)) == list(cache.rows(split="train"))[:3]


def test_only_asked_columns_are_decoded_and_few_groups_kept(tmp_path):
    cache = _cache(tmp_path)
    rows = cache.split_rows("train", columns=["pair_id", "chosen_ids"])
    assert set(rows[0]) == {"pair_id", "chosen_ids"}
    for i in range(len(rows)):
        rows[i]
    assert len(rows._groups) <= rows.keep_groups


def test_skip_identical_leaves_out_pairs_with_the_same_response_ids(tmp_path):
    cache = _cache(tmp_path)  # chosen [3, 5] == rejected [3, 5] for every third row
    full = list(cache.rows(split="train"))
    same = sorted(r["pair_id"] for r in full if r["chosen_ids"] == r["rejected_ids"])
    rows = cache.split_rows("train", skip_identical=True)
    assert same and sorted(rows.identical) == same
    assert list(rows) == [r for r in full if r["pair_id"] not in same]
