"""pipeline.refcache.fingerprint: what differs between two fingerprints, named to the field that differs."""

from __future__ import annotations

from pipeline.refcache.fingerprint import describe_difference, fingerprint_differences, fingerprint_digest


def test_a_mismatch_message_shows_both_full_hashes():
    a, b = "ab" * 32, "ab" * 31 + "cd"
    found = {"model": {"kind": "folder", "config_sha256": "c" * 64, "weights": {"model.safetensors": a}}}
    expected = {"model": {"kind": "folder", "config_sha256": "c" * 64, "weights": {"model.safetensors": b}}}
    text = describe_difference(expected, found, "model")
    assert text == f'model.weights.model.safetensors: cache has "{a}", this run has "{b}"'
    long_a, long_b = "x" * 150 + "A" + "y" * 50, "x" * 150 + "B" + "y" * 50
    text = describe_difference({"f": long_b}, {"f": long_a}, "f")
    assert "xA" in text and "xB" in text  # the differing part, on both sides


def test_differences_name_changed_and_missing_fields_and_the_digest_follows_content():
    a = {"samples": 8, "seed": 0, "eps": None}
    assert fingerprint_differences(a, {"samples": 8, "seed": 1, "eps": None}) == ["seed"]
    assert fingerprint_differences(a, {"samples": 8, "seed": 0}) == []  # absent reads as None: caches before a field
    assert fingerprint_differences(a, {"samples": 8, "seed": 0, "eps": None, "new": 1}) == ["new"]
    assert fingerprint_digest(a) == fingerprint_digest(dict(reversed(list(a.items()))))  # key order is not content
    assert fingerprint_digest(a) != fingerprint_digest({**a, "seed": 1}) and len(fingerprint_digest(a)) == 16
