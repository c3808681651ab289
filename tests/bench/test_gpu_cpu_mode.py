"""bench/gpu.py --mode cpu: the GPU proof's code paths on a small shape, so the script cannot rot without a GPU."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu.py"


def _numbers(obj, path=""):
    """Every int/float leaf (bools excluded) with its JSON path."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return
    if isinstance(obj, (int, float)):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{path}[{i}]")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-cpu")
    # Time boxes scaled up: this checks the code paths, and a loaded CI machine must not skip a configuration.
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--mode", "cpu", "--time-scale", "5"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads((out / "gpu_results.json").read_text())


def test_every_section_ran(results):
    assert results["complete"] is True and not results.get("errors")
    for name in ("environment", "build", "score_ref", "sampler", "faithful", "train", "reference", "train_4bit", "fsdp"):
        assert name in results, name
    for name in ("build", "score_ref", "sampler", "faithful", "train", "fsdp"):
        assert results[name]["status"] == "ok", (name, results[name])


def test_numbers_are_finite(results):
    leaves = list(_numbers(results))
    assert len(leaves) > 40
    bad = [(p, v) for p, v in leaves if not math.isfinite(v)]
    assert not bad, bad


def test_score_ref_and_faithful_figures(results):
    s = results["score_ref"]
    assert s["pairs_scored"] == s["pairs_requested"] == 4 and s["terms_finite"]
    assert s["tokens"] > s["masked_tokens"] > 0
    assert s["tokens_per_s"] > 0 and s["tflops"] > 0 and 0 < s["mfu"]
    f = results["faithful"]
    assert f["pairs_measured"] >= 1 and f["speed_ratio_same_pairs"] > 0
    assert f["extrapolated"] == (f["pairs_measured"] < f["extrapolated_to_pairs"])


def test_train_configs_and_reference_ratios(results):
    configs = results["train"]["configs"]
    assert set(configs) == {"cached", "cached_seqmb1", "online", "online_seqmb1"}
    for c in configs.values():
        assert c["step_s"] > 0 and c["peak_bytes"] > 0
        assert all(math.isfinite(x) for x in c["loss"])
    # Same batch, same masks, same starting adapters (B = 0): cached and online references give the same loss.
    assert configs["cached"]["loss"][0] == pytest.approx(0.6931, abs=0.01)
    assert results["train"]["trainable_parameters"] > 0
    ref = results["reference"]
    for key in ("one_pass", "sequence_microbatch"):
        assert ref[key]["step_time_ratio"] > 0 and ref[key]["memory_ratio"] > 0


def test_4bit_section_skipped_with_reason_on_cpu(results):
    assert results["train_4bit"]["status"] == "skipped"
    assert "CUDA" in results["train_4bit"]["skipped"]


def test_gpu_mode_without_cuda_is_a_clear_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "--mode cpu" in proc.stderr
    assert not (tmp_path / "gpu_results.json").exists()


def test_fsdp_section_matches_the_plain_run(results):
    f = results["fsdp"]
    assert f["config"] == "fsdp_cpu.yaml" and len(f["loss_fsdp"]) == len(f["loss_plain"]) == f["steps"]
    assert f["max_loss_difference"] < 1e-4 and f["max_weight_difference"] < 1e-4
    assert f["checkpoint_sharded"] and f["checkpoint_optimizer_shards"] == 1 and f["checkpoint_is_model"]
    assert f["step_s_fsdp"] > 0 and f["peak_bytes_fsdp"] > 0


def test_plan_recorded_next_to_each_measured_section(results):
    """The plan of each section's work sits beside its measured peak (on CPU the ratio is not taken: RSS)."""
    plans = [results["score_ref"]["plan"]] + [c["plan"] for c in results["train"]["configs"].values()]
    for plan in plans:
        assert "error" not in plan, plan
        assert plan["tracked_bytes"] > 0 and plan["total_bytes"] > plan["tracked_bytes"]
        assert plan["measured_over_planned"] is None
        assert plan["components"]["activations"] > 0
    configs = results["train"]["configs"]
    # sequence micro-batching keeps fewer activations alive than one pass, in the plan as on a card.
    assert configs["cached_seqmb1"]["plan"]["tracked_bytes"] < configs["cached"]["plan"]["tracked_bytes"]


def test_sampler_section_compares_exact_with_the_fast_settings(results):
    s = results["sampler"]
    rows = {r["label"]: r for r in s["rows"]}
    assert list(rows) == ["exact", "prefix", "dual", "threshold 0.9", "prefix + 0.9", "dual + 0.9"]
    assert rows["exact"]["speedup"] == 1.0 and rows["exact"]["same_as_exact"] == 1.0
    # One pass per step for the exact sampler; the cached ones take as many (the block's first one is full).
    assert rows["exact"]["passes"] == rows["prefix"]["passes"] == rows["dual"]["passes"] == s["steps"]
    for r in rows.values():
        assert r["tokens_per_second"] > 0 and 1 <= r["passes"] <= s["steps"]
