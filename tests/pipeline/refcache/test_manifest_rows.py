"""The cache's contract by name: SCORES_SCHEMA's columns, the manifest's keys and accessors (an older manifest's
defaults), a row's values, and the parts' plan."""

from __future__ import annotations

import pytest

from pipeline.core.schemas import DEFAULT_SPLIT, SCORES_SCHEMA, split_of
from pipeline.refcache.manifest import CacheManifest, build_manifest
from pipeline.refcache.rows import length, reference_elbo, reference_mean, reference_terms, responses_differ, row_split
from pipeline.refcache.writer import plan_parts


def test_the_schema_keeps_its_columns_in_order():
    """Existing caches are read by these names in this order: a change here breaks them."""
    assert SCORES_SCHEMA.names == [
        "pair_id", "split", "prompt_ids", "chosen_ids", "rejected_ids", "prompt_len", "chosen_len", "rejected_len",
        "truncated", "chosen_seeds", "rejected_seeds", "chosen_mask_counts", "rejected_mask_counts",
        "chosen_timesteps", "rejected_timesteps", "ref_chosen_terms", "ref_rejected_terms", "ref_chosen_elbo",
        "ref_rejected_elbo", "ref_margin"]


def test_the_manifest_has_the_keys_score_ref_always_wrote():
    totals = {"pairs": 3, "tokens": 90, "truncated": 1, "identical_after_truncation": 0}
    fingerprint = {"samples": 2, "draws": 3, "dtype": "bfloat16", "mixed_precision": "no", "load_in_4bit": False}
    m = build_manifest(fingerprint=fingerprint, digest="d" * 16, totals=totals,
                       part_sha256={"part-00000.parquet": "a", "part-00001.parquet": "b"}, padding_fraction=0.25,
                       config={"model": "micro", "batch_tokens": 512}, processes=2)
    assert sorted(m) == sorted(["fingerprint", "fingerprint_digest", "pairs", "tokens", "parts", "part_sha256",
                                "truncated", "padding_fraction", "identical_after_truncation", "schema", "config",
                                "processes"])
    assert m["parts"] == ["part-00000.parquet", "part-00001.parquet"] and m["schema"] == SCORES_SCHEMA.names
    read = CacheManifest(m)
    assert (read.reference_model, read.batch_tokens, read.digest, read.pairs, read.tokens) == ("micro", 512,
                                                                                              "d" * 16, 3, 90)
    assert (read.truncated, read.identical_after_truncation, read.padding_fraction) == (1, 0, 0.25)
    assert read.part_sha256 == {"part-00000.parquet": "a", "part-00001.parquet": "b"}
    assert (read.samples, read.draws, read.numerics.dtype, read.numerics.load_in_4bit) == (2, 3, "bfloat16", False)


def test_an_older_manifest_reads_with_the_defaults():
    """Manifests from before parts, checksums, counts or a recorded token budget."""
    old = CacheManifest({"fingerprint": {}, "pairs": 4, "tokens": 10, "padding_fraction": 0.0,
                         "config": {"model": "tiny"}})
    assert old.parts is None and old.part_sha256 == {} and old.digest is None
    assert old.batch_tokens == 16384 and old.truncated == 0 and old.identical_after_truncation == 0
    assert CacheManifest({"fingerprint": {}}).config == {}
    with pytest.raises(KeyError):
        CacheManifest({"fingerprint": {}}).reference_model  # noqa: B018 (no model recorded: not guessed)


def test_a_rows_values_by_name():
    row = {"split": None, "chosen_len": 3, "rejected_len": 2, "prompt_len": 4,
           "chosen_ids": [5, 6, 7], "rejected_ids": [5, 6],
           "ref_chosen_terms": [[-1.0, -2.0], [-4.0, -8.0]], "ref_rejected_terms": [[-3.0, -3.0], [-0.5, -1.5]],
           "ref_chosen_elbo": -3.75, "ref_rejected_elbo": -2.0}
    assert row_split(row) == DEFAULT_SPLIT == "train" and split_of("eval") == "eval" and split_of("") == "train"
    assert reference_terms(row, "chosen", 1) == [-4.0, -8.0]
    assert reference_mean(row, "chosen", 0) == -1.5 and reference_mean(row, "rejected", 1) == -1.0
    assert reference_elbo(row, "chosen") == -3.75
    assert (length(row, "prompt"), length(row, "chosen"), length(row, "rejected")) == (4, 3, 2)
    assert responses_differ(row) and not responses_differ({**row, "rejected_ids": [5, 6, 7]})


def test_parts_hold_one_split_each_longest_first_ties_by_pair_id():
    lengths = [5, 9, 5, 7, 3, 9]
    ids = ["f", "e", "d", "c", "b", "a"]
    splits = ["train", "eval", "train", "train", "eval", "train"]
    # eval before train (sorted); within a split longest first, ties by pair_id (a before f, d before ...)
    assert plan_parts(lengths, ids, 2, splits) == [[1, 4], [5, 3], [2, 0]]
    assert plan_parts(lengths, ids, 4) == [[5, 1, 3, 2], [0, 4]]  # no split column: all train
