"""Edge cases found in review: empty 1/t masks, resume layouts, truncation, reused run folders, stale results."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.cache import open_cache
from pipeline.errors import UserError
from pipeline.models import load_model
from stages.score_ref import ScoreRefConfig, score_part
from stages.score_ref import run as score
from stages.train import TrainConfig
from stages.train import run as train
from tests.conftest import ingest_pairs

FAST = dict(learning_rate=3e-3, warmup_ratio=0.0, device="cpu", progress=False, tensorboard=False)


@pytest.fixture(scope="module")
def one_over_t_cache(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ot")
    pairs = ingest_pairs(tmp, n=8, eval_fraction=0.0)
    out = tmp / "cache"
    # samples=1 and many draws: some (pair, side, draw) masks come out empty under 1/t.
    score(ScoreRefConfig(pairs=pairs, model="micro", out=out, samples=1, draws=40, scheme="one_over_t", eps=0.02,
                         device="cpu", progress=False))
    return out


def test_one_over_t_cache_has_empty_masks_and_trains_through_them(one_over_t_cache, tmp_path):
    rows = open_cache(one_over_t_cache).table().to_pylist()
    empty = sum(c == 0 for r in rows for side in ("chosen", "rejected") for d in r[f"{side}_mask_counts"] for c in d)
    assert empty > 0  # the situation under test exists
    for k in (0, 1):
        result = train(TrainConfig(scores=one_over_t_cache, out=tmp_path / f"k{k}", batch_size=1, epochs=40,
                                   sequence_microbatch=k, **FAST))
        assert result.steps == 8 * 40


def test_resume_with_another_pairs_per_part_is_refused(small_pairs, tmp_path):
    out = tmp_path / "c"
    # The fingerprint records the resolved rendering rule (micro's tokenizer has a chat template).
    cfg = dict(pairs=small_pairs, model="micro", out=out, samples=2, device="cpu", progress=False, chat_template=True)
    score(ScoreRefConfig(pairs_per_part=8, **cfg))
    (out / "manifest.json").unlink()  # as if killed before the end, with every part written
    (out / "fingerprint.json").write_text(json.dumps(_fingerprint_of(small_pairs, cfg)))
    for p in sorted(out.glob("part-*.parquet"))[1:]:
        p.unlink()
    kept = pq.read_metadata(sorted(out.glob("part-*.parquet"))[0]).num_rows
    with pytest.raises(UserError, match=r"holds other pairs than this run assigns to part 0; resume with the "
                                        r"--pairs-per-part"):
        score(ScoreRefConfig(pairs_per_part=1, **cfg))  # parts hold one split each: part 0 differs at size 1
    result = score(ScoreRefConfig(pairs_per_part=8, **cfg))  # the original layout resumes
    assert result.pairs == 20 and result.scored_now == 20 - kept


def _fingerprint_of(pairs, cfg):
    from pipeline.models import model_identity, tokenizer_identity
    from pipeline.pairsfile import pairs_sha256, read_pairs
    from stages.score_ref import build_fingerprint

    _, tok = load_model("micro")
    return build_fingerprint(ScoreRefConfig(**cfg), model_identity("micro"), tokenizer_identity(tok),
                             pairs_sha256(read_pairs(pairs)))


def test_truncation_leaving_no_prompt_is_a_clear_error_for_shifted_models(small_pairs):
    from pipeline.pairsfile import read_pairs

    model, tok = load_model("micro")
    model.logits_shift = True
    rows = read_pairs(small_pairs).to_pylist()[:1]
    cfg = ScoreRefConfig(pairs=small_pairs, model="micro", samples=2, max_length=6, device="cpu")
    with pytest.raises(UserError, match=r"truncation to --max-length 6 left no prompt token"):
        score_part(model, tok, rows, cfg, {"tokens": 0, "padded_tokens": 0, "real_tokens": 0})


def test_identical_after_truncation_is_counted_and_skipped_by_train(small_pairs, tmp_path, capsys):
    from stages.ingest import IngestConfig
    from stages.ingest import run as ingest

    # Three pairs differ only after a long shared start: cut at 24 tokens, their responses are the same.
    long = "step by step " * 12
    rows = [{"prompt": f"q{i}", "chosen": long + "yes", "rejected": long + "no"} for i in range(3)]
    rows += [{"prompt": f"What is {i} + 1?", "chosen": f"{i + 1}", "rejected": f"{i + 2}"} for i in range(5)]
    src = tmp_path / "p.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = Path(ingest(IngestConfig(inputs=[str(src)], out=str(tmp_path / "p.arrow"), progress=False)).out)
    out = tmp_path / "c"
    result = score(ScoreRefConfig(pairs=pairs, model="micro", out=out, samples=2, max_length=24, device="cpu",
                                  progress=False, chat_template=False))  # lengths of the raw text
    assert result.identical_after_truncation == 3 and result.truncated >= 3 and result.pairs == 8
    assert json.loads((out / "manifest.json").read_text())["identical_after_truncation"] == 3
    train(TrainConfig(scores=out, out=tmp_path / "r", max_steps=1, **FAST))
    assert "skipping 3 pair(s) whose responses are identical after truncation" in capsys.readouterr().err
    # When truncation leaves nothing to tell apart, score-ref refuses before scoring.
    with pytest.raises(UserError, match=r"all 20 pairs are longer than --max-length 3"):
        score(ScoreRefConfig(pairs=small_pairs, model="micro", out=tmp_path / "c3", samples=2, max_length=3,
                             device="cpu", progress=False))


def test_fresh_train_into_a_used_run_folder_is_refused_then_overwritten(small_cache, tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(scores=small_cache, out=out, max_steps=1, batch_size=2, **FAST))
    with pytest.raises(UserError, match=r"already holds a run \(final, metrics.parquet\).*--overwrite"):
        train(TrainConfig(scores=small_cache, out=out, max_steps=1, batch_size=2, **FAST))
    train(TrainConfig(scores=small_cache, out=out, max_steps=2, batch_size=2, overwrite=True, **FAST))
    assert pq.read_table(out / "metrics.parquet").num_rows == 2


def test_resume_with_another_batch_size_is_refused(small_cache, tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(scores=small_cache, out=out, max_steps=4, batch_size=2, save_every=2, **FAST))
    shutil.rmtree(out / "final")
    with pytest.raises(UserError, match=r"cannot resume with batch_size = 3; the run was started with batch_size = 2"):
        train(TrainConfig(scores=small_cache, out=out, max_steps=4, batch_size=3, resume=True, **FAST))


def test_policy_with_another_tokenizer_is_refused(small_cache, tmp_path):
    model, tok = load_model("micro")
    folder = tmp_path / "m"
    model.save_pretrained(folder)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok.save_pretrained(folder)
    with pytest.raises(UserError, match="tokenizer differs from the one the cache was scored with"):
        train(TrainConfig(scores=small_cache, out=tmp_path / "r", model=str(folder), allow_different_init=True,
                          max_steps=1, **FAST))


def test_eval_without_benchmark_removes_stale_task_results(small_cache, tmp_path):
    from pipeline.atomic import atomic_path
    from stages.evaluate import EvalConfig
    from stages.evaluate import run as evaluate

    stale = tmp_path / "task_results.parquet"
    with atomic_path(stale, record=True) as tmp:  # as an earlier eval wrote it
        tmp.write_bytes(b"old")
    evaluate(EvalConfig(model="micro", scores=small_cache, out=tmp_path, device="cpu", before="none"))
    assert not stale.exists()


def test_sequence_microbatch_with_lora_dropout_is_refused():
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="sequence_microbatch needs lora_dropout = 0"):
        TrainConfig(sequence_microbatch=2, lora_r=4, lora_dropout=0.1)


def test_every_config_field_has_a_flag():
    """What YAML can set, the command line can set too (field names as --kebab-case)."""
    import inspect

    from stages import evaluate, score_ref, train
    from stages.train import TrainConfig as TC

    for module, cls in ((score_ref, score_ref.ScoreRefConfig), (train, TC), (evaluate, evaluate.EvalConfig)):
        params = set(inspect.signature(module.command).parameters)
        fields = {f for f in cls.__dataclass_fields__}
        missing = fields - params - {"progress"}  # progress is --no-progress / --quiet
        assert not missing, f"{cls.__name__}: no flag for {sorted(missing)}"
