"""The 16 GB recipe executed on the CPU: a 4-bit NF4 reference cache, QLoRA training on it, eval, generate,
make-pairs and merge, and the cache's contract in 4-bit (its numerics followed; a 4-bit policy against an
unquantized cache, and the reverse, refused with both values named unless allowed)."""

from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest
import torch

from pipeline.core.errors import UserError
from pipeline.models.quant import bitsandbytes_problem
from pipeline.refcache.reader import open_cache
from stages.evaluate import EvalConfig
from stages.evaluate import run as evaluate
from stages.score_ref import ScoreRefConfig
from stages.score_ref import run as score
from stages.train import TrainConfig
from stages.train import run as train

pytestmark = pytest.mark.skipif(bitsandbytes_problem() is not None, reason=str(bitsandbytes_problem()))

FAST = dict(learning_rate=3e-3, warmup_ratio=0.0, scheduler="constant", device="cpu", progress=False,
            tensorboard=False)


@pytest.fixture(scope="module")
def cache4(tmp_path_factory, small_pairs):
    """The pairs scored by `micro` with a 4-bit NF4 base (bfloat16 compute)."""
    out = tmp_path_factory.mktemp("quant") / "scores4"
    score(ScoreRefConfig(pairs=small_pairs, model="micro", out=out, samples=2, draws=2, load_in_4bit=True,
                         pairs_per_part=4, device="cpu", progress=False))
    return out


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory, cache4):
    """Two QLoRA steps on the 4-bit cache, naming no numerics (train follows the cache)."""
    out = tmp_path_factory.mktemp("quant") / "run"
    train(TrainConfig(scores=cache4, out=out, lora_r=4, gradient_checkpointing=True, max_steps=2, batch_size=4,
                      beta=0.1, **FAST))
    return out


def test_the_cache_records_a_4bit_base(cache4):
    fp = open_cache(cache4).fingerprint
    assert (fp["dtype"], fp["mixed_precision"], fp["load_in_4bit"]) == ("bfloat16", "no", True)


def test_qlora_follows_the_cache_and_starts_at_log_2(qlora_run):
    config = (qlora_run / "config.yaml").read_text()
    assert "load_in_4bit: true" in config and "dtype: bfloat16" in config
    first, second = pq.read_table(qlora_run / "metrics.parquet").to_pylist()
    # The cache's own model in the cache's numerics: the same NF4 codes and dequantize-and-multiply path as
    # score-ref (bfloat16 matmuls may still differ in the last bits between batch shapes).
    assert abs(first["loss"] - math.log(2)) < 1e-3
    assert first["ref/gap_max"] < 1e-2
    assert second["loss"] != first["loss"]  # the adapters moved: gradients flow through the 4-bit layers
    adapter = json.loads((qlora_run / "final" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "micro" and adapter["r"] == 4


def test_eval_of_the_cache_model_in_4bit_is_exactly_one_half(cache4, qlora_run, tmp_path):
    result = evaluate(EvalConfig(model="micro", scores=cache4, out=tmp_path / "e", device="cpu", train_sample=4))
    assert result.preference_accuracy == {"before": 0.5, "after": 0.5}
    assert result.mean_margin == {"before": 0.0, "after": 0.0}
    # The trained adapter evaluates on its 4-bit base (the cache's numerics) and moved off the reference.
    trained = evaluate(EvalConfig(model=str(qlora_run / "final"), scores=cache4, out=tmp_path / "t", device="cpu"))
    assert trained.mean_margin["before"] == 0.0 and trained.mean_margin["after"] != 0.0


def test_4bit_policy_against_an_unquantized_cache_and_the_reverse_are_refused(cache4, small_cache, tmp_path):
    with pytest.raises(UserError, match=r"scored with load_in_4bit=False, this run asks for load_in_4bit=True; "
                                        r"drop --load-in-4bit .*--allow-numerics-mismatch"):
        train(TrainConfig(scores=small_cache, out=tmp_path / "a", lora_r=4, load_in_4bit=True, max_steps=1, **FAST))
    with pytest.raises(UserError, match=r"scored with load_in_4bit=True, this run asks for load_in_4bit=False"):
        train(TrainConfig(scores=cache4, out=tmp_path / "b", lora_r=4, load_in_4bit=False, max_steps=1, **FAST))
    with pytest.raises(UserError, match=r"scored with load_in_4bit=True, this run asks for load_in_4bit=False"):
        evaluate(EvalConfig(model="micro", scores=cache4, out=tmp_path / "c", device="cpu", load_in_4bit=False))
    with pytest.raises(UserError, match=r"scored with load_in_4bit=False, this run asks for load_in_4bit=True"):
        evaluate(EvalConfig(model="micro", scores=small_cache, out=tmp_path / "d", device="cpu", load_in_4bit=True))
    # Allowed: the 4-bit policy trains against the float32 cache, and starts off the reference (it is not it).
    train(TrainConfig(scores=small_cache, out=tmp_path / "e", lora_r=4, load_in_4bit=True, gap_threshold=0.0,
                      allow_numerics_mismatch=True, max_steps=1, batch_size=2, **FAST))
    assert "load_in_4bit: true" in (tmp_path / "e" / "config.yaml").read_text()
    (row,) = pq.read_table(tmp_path / "e" / "metrics.parquet").to_pylist()
    assert row["ref/gap_max"] > 0.0


def test_a_4bit_cache_with_full_fine_tuning_is_refused(cache4, tmp_path):
    with pytest.raises(UserError, match=r"scored with a 4-bit base \(load_in_4bit\), which trains adapters only"):
        train(TrainConfig(scores=cache4, out=tmp_path / "full", max_steps=1, **FAST))


def test_merge_dequantizes_the_4bit_base_before_folding_the_adapter(qlora_run, tmp_path):
    from pipeline.models import load, load_model
    from pipeline.models.numerics import Numerics
    from stages.merge import MergeConfig
    from stages.merge import run as merge

    merge(MergeConfig(adapter=qlora_run / "final", out=tmp_path / "m4", load_in_4bit=True))
    merge(MergeConfig(adapter=qlora_run / "final", out=tmp_path / "m"))
    assert "quantization_config" not in json.loads((tmp_path / "m4" / "config.json").read_text())
    policy, _ = load(str(qlora_run / "final"), Numerics("bfloat16", "no", True), "cpu")
    ids = torch.randint(10, 500, (2, 12))
    with torch.no_grad():
        target = policy(input_ids=ids).logits.float()
        errors = {}
        for name in ("m4", "m"):
            merged, _ = load_model(tmp_path / name)  # a plain float32 checkpoint either way
            errors[name] = (merged(ids).logits.float() - target).abs().max().item()
    # Folded into the dequantized NF4 weights the merged model computes what the trained 4-bit policy computed
    # (up to its bfloat16 compute); folded into the original weights it does not.
    assert errors["m4"] < 0.2 * errors["m"]


def test_generate_and_make_pairs_in_4bit(cache4, tmp_path):
    from stages.generate import GenerateConfig
    from stages.generate import run as generate
    from stages.make_pairs import MakePairsConfig
    from stages.make_pairs import run as make_pairs

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What is {a} + 1?", "answer": str(a + 1)}) + "\n"
                               for a in range(3)))
    kw = dict(model="micro", gen_length=8, block_length=8, steps=4, device="cpu", progress=False)
    cfg = GenerateConfig(prompts=str(prompts), out=str(tmp_path / "g.jsonl"), load_in_4bit=True, **kw)
    assert cfg.dtype == "bfloat16"
    result = generate(cfg)
    rows = [json.loads(line) for line in (tmp_path / "g.jsonl").read_text().splitlines()]
    assert result.generated_now == 3 and rows[0]["sampler"]["load_in_4bit"] is True
    # The same settings in 4-bit are done; without 4-bit they are other settings (no mixing in one file).
    assert generate(cfg).generated_now == 0
    pairs = make_pairs(MakePairsConfig(questions=str(prompts), out=str(tmp_path / "p.jsonl"), load_in_4bit=True,
                                       num_generations=2, temperature=1.0, **kw))
    assert pairs.samples == 6


def test_the_shipped_qlora_variant_of_the_default_runs_on_cpu(tmp_path):
    """configs/run_qlora.yaml over the embedded default: its model (none named in the file), a 4-bit cache, QLoRA
    training and eval in the cache's numerics; shrunk here to the micro model and a few steps."""
    import yaml

    from stages.run_all import EMBEDDED_DEFAULT, merged_config, stage_configs
    from stages.run_all import run as run_all
    from stages.run_stages import REPO_ROOT

    shipped = REPO_ROOT / "configs" / "run_qlora.yaml"
    assert "model" not in yaml.safe_load(shipped.read_text())
    _, score_cfg, train_cfg, _ = stage_configs(merged_config(shipped, {"out": tmp_path / "x"}))
    default_model = yaml.safe_load(EMBEDDED_DEFAULT.read_text())["model"]
    assert score_cfg.model == train_cfg.model == default_model
    assert score_cfg.load_in_4bit and train_cfg.lora_r > 0 and train_cfg.load_in_4bit is None  # train follows
    shrunk = {"out": tmp_path / "out", "model": "micro", "device": "cpu", "report": False,
              "score_ref": {"limit": 24, "samples": 2, "max_length": 128},
              # the preference loss alone, so step 1's loss is exactly log 2 (the default adds the NLL term)
              "train": {"max_steps": 2, "batch_size": 8, "save_every": 0, "loss": "sigmoid", "loss_weights": [1.0]},
              "eval": {"limit_task": 2, "gen_length": 8, "block_length": 8, "steps": 4, "batch_size": 2,
                       "limit_choices": 2, "samples": 2}}
    result = run_all(merged_config(shipped, shrunk), log=lambda *a, **k: None)
    fp = json.loads((tmp_path / "out" / "cache" / "manifest.json").read_text())["fingerprint"]
    assert fp["load_in_4bit"] is True and fp["dtype"] == "bfloat16"
    assert "load_in_4bit: true" in (tmp_path / "out" / "run" / "config.yaml").read_text()
    assert result.preference_accuracy["before"] == 0.5  # the 4-bit reference against itself
    first = pq.read_table(tmp_path / "out" / "run" / "metrics.parquet").to_pylist()[0]
    assert abs(first["loss"] - math.log(2)) < 1e-3 and first["ref/gap_max"] < 1e-2
