"""score-ref: a faithful, fingerprinted, resumable cache whose content does not depend on how it was computed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from pipeline.core.errors import UserError
from pipeline.core.schemas import SCORES_SCHEMA
from pipeline.data.pairsfile import read_pairs
from pipeline.refcache.reader import open_cache
from stages.cli import app
from stages.score_ref import ScoreRefConfig, run
from tests.conftest import accelerate_launch, ingest_pairs


def _cfg(pairs, out, **kw):
    base = dict(pairs=pairs, model="micro", out=out, samples=3, draws=2, pairs_per_part=4, device="cpu",
                progress=False)
    base.update(kw)
    return ScoreRefConfig(**base)


def _content(directory: Path):
    table = open_cache(directory).table().sort_by("pair_id")
    return table.to_pylist()


def test_cache_has_every_pair_with_schema_and_manifest(small_pairs, small_cache):
    cache = open_cache(small_cache)
    table = cache.table()
    assert table.schema.equals(SCORES_SCHEMA, check_metadata=False)
    pairs = read_pairs(small_pairs)
    assert sorted(table["pair_id"].to_pylist()) == sorted(pairs["pair_id"].to_pylist())
    assert set(table["split"].to_pylist()) == {"train", "eval"}
    for row in table.to_pylist():
        assert len(row["chosen_seeds"]) == 2 and len(row["ref_chosen_terms"]) == 2  # draws
        assert all(len(d) == 3 for d in row["ref_rejected_terms"])  # samples
        assert row["chosen_ids"][-1] == row["rejected_ids"][-1]  # both end with EOS
        assert row["chosen_len"] == len(row["chosen_ids"])
        flat = [v for d in row["ref_chosen_terms"] for v in d]
        assert row["ref_chosen_elbo"] == pytest.approx(sum(flat) / len(flat))
        assert row["ref_margin"] == pytest.approx(row["ref_chosen_elbo"] - row["ref_rejected_elbo"])
        assert all(v < 0 for v in flat)  # log-likelihood terms
    fp = cache.fingerprint
    for key in ("model", "tokenizer", "samples", "draws", "seed", "max_length", "pad_to", "pairs_sha256", "dtype",
                "estimator", "chat_template", "package_version"):
        assert key in fp
    assert cache.manifest.pairs == table.num_rows


def test_cache_terms_equal_a_direct_estimator_call(small_cache):
    """The cache is a faithful record: the recorded seeds reproduce masks, counts and terms."""
    from pipeline.estimator.diffusion import ScoreRequest, elbo_terms, mask_seed, sample_masks
    from pipeline.models import load_model

    model, tok = load_model("micro")
    cache = open_cache(small_cache)
    rows = cache.table().to_pylist()[:3]
    for row in rows:
        for side in ("chosen", "rejected"):
            for draw in range(2):
                seed = row[f"{side}_seeds"][draw]
                assert seed == mask_seed(0, row["pair_id"], side, draw)
                ms = sample_masks(len(row[f"{side}_ids"]), 3, seed)
                assert ms.counts.tolist() == row[f"{side}_mask_counts"][draw]
                with torch.no_grad():
                    (terms,) = elbo_terms(model, [ScoreRequest(row["prompt_ids"], row[f"{side}_ids"], ms.masks,
                                                               ms.weights)],
                                          mask_token_id=tok.mask_token_id, pad_token_id=tok.pad_token_id)
                assert terms.tolist() == pytest.approx(row[f"ref_{side}_terms"][draw], rel=1e-6, abs=1e-6)


def test_unchanged_rerun_does_no_work(small_pairs, small_cache, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(small_cache, out)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    result = run(_cfg(small_pairs, out))
    assert result.reused and result.scored_now == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


@pytest.mark.parametrize(
    "change, field",
    [({"samples": 4}, "samples"), ({"seed": 1}, "seed"), ({"max_length": 40}, "max_length"),
     ({"draws": 1}, "draws"), ({"scheme": "one_over_t"}, "scheme"), ({"model": "tiny"}, "model"),
     ({"pad_to": 16}, "pad_to"), ({"pair_masks": "shared"}, "pair_masks")],
)
def test_changed_setting_is_refused_naming_the_field(small_pairs, small_cache, tmp_path, change, field):
    out = tmp_path / "copy"
    shutil.copytree(small_cache, out)
    with pytest.raises(UserError, match=rf"different settings \(.*{field}"):
        run(_cfg(small_pairs, out, **change))
    assert _content(out) == _content(small_cache)  # nothing touched


def test_changed_pairs_file_weights_and_tokenizer_are_detected(tmp_path):
    from pipeline.models import load_model

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    pairs = ingest_pairs(tmp_path / "a", n=4)
    model, tok = load_model("micro")
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    out = tmp_path / "cache"
    run(_cfg(pairs, out, model=str(folder), draws=1))

    other_pairs = ingest_pairs(tmp_path / "b", n=5)
    with pytest.raises(UserError, match=r"pairs_sha256"):
        run(_cfg(other_pairs, out, model=str(folder), draws=1))

    with torch.no_grad():
        model.get_output_embeddings().weight[0, 0] += 1.0
    model.save_pretrained(folder)
    with pytest.raises(UserError, match=r"\(model"):
        run(_cfg(pairs, out, model=str(folder), draws=1))

    model.get_output_embeddings().weight.data[0, 0] -= 1.0
    model.save_pretrained(folder)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok.save_pretrained(folder)
    with pytest.raises(UserError, match=r"tokenizer"):
        run(_cfg(pairs, out, model=str(folder), draws=1))

    result = run(_cfg(pairs, out, model=str(folder), draws=1, overwrite=True))
    assert result.scored_now == 4 and not result.reused


def test_non_finite_score_names_the_pair(small_pairs, tmp_path, monkeypatch):
    import pipeline.estimator.diffusion as diffusion

    def nan_terms(model, requests, **kw):
        return [torch.full((r.masks.shape[0],), float("nan"), dtype=torch.float64) for r in requests]

    monkeypatch.setattr(diffusion, "elbo_terms", nan_terms)
    with pytest.raises(UserError, match=r"reference score for pair [0-9a-f]+ \(chosen\) is not finite"):
        run(_cfg(small_pairs, tmp_path / "c"))
    assert not (tmp_path / "c" / "manifest.json").exists()


def _cli(pairs, out, *extra):
    return [sys.executable, "-m", "stages.cli", "score-ref", str(pairs), "--model", "micro", "--out", str(out),
            "--samples", "3", "--draws", "2", "--device", "cpu", "--no-progress", *extra]


def test_sigkill_mid_run_then_resume_matches_uninterrupted(tmp_path):
    pairs = ingest_pairs(tmp_path, n=24)
    full = tmp_path / "full"
    subprocess.run(_cli(pairs, full, "--pairs-per-part", "1"), check=True, capture_output=True)

    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli(pairs, out, "--pairs-per-part", "1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("part-*.parquet"))) < 3:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    parts_at_kill = len(list(out.glob("part-*.parquet")))
    assert 3 <= parts_at_kill < 24 and not (out / "manifest.json").exists()  # really mid-way
    for p in out.glob("part-*.parquet"):
        pq.read_table(p)  # every part under its final name is whole

    result = subprocess.run(_cli(pairs, out, "--pairs-per-part", "1", "--json"), check=True, capture_output=True,
                            text=True)
    summary = json.loads(result.stdout)
    assert summary["scored_now"] == 24 - parts_at_kill
    assert summary["reused"] and summary["reused_pairs"] == parts_at_kill  # the resume says what it reused
    assert _content(out) == _content(full)
    assert not list(out.glob("*.tmp"))


@pytest.mark.slow
def test_accelerate_two_processes_match_one(small_pairs, small_cache, tmp_path):
    out = tmp_path / "multi"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # --multi_gpu is accelerate's torchrun-style launcher; without CUDA our stages join it as gloo CPU workers.
    cmd = [*accelerate_launch(), "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "stages.cli", "score-ref", str(small_pairs), "--model", "micro", "--out", str(out),
           "--samples", "3", "--draws", "2", "--pairs-per-part", "4", "--device", "auto", "--no-progress", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["processes"] == 2
    assert json.loads(proc.stdout)["scored_now"] == 20
    one, two = _content(small_cache), _content(out)
    assert [r["pair_id"] for r in one] == [r["pair_id"] for r in two]  # each pair once
    for a, b in zip(one, two):
        assert a["chosen_ids"] == b["chosen_ids"] and a["chosen_mask_counts"] == b["chosen_mask_counts"]
        assert a["ref_margin"] == pytest.approx(b["ref_margin"], abs=1e-5)


def test_cli_json_summary_and_print_config(small_pairs, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["score-ref", str(small_pairs), "--model", "micro", "--out", str(tmp_path / "c"),
                              "--samples", "2", "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert set(data) >= {"pairs", "tokens", "seconds", "padding_fraction", "out", "fingerprint"}
    assert data["pairs"] == 20 and 0 <= data["padding_fraction"] < 1
    res = runner.invoke(app, ["score-ref", str(small_pairs), "--samples", "5", "--print-config"])
    assert res.exit_code == 0 and "samples: 5" in res.stdout
    res = runner.invoke(app, ["score-ref", str(tmp_path / "missing.arrow"), "--device", "cpu"])
    assert res.exit_code == 1 and "pairs file not found" in res.output


def test_part_checksums_are_checked_on_read(small_cache, tmp_path):
    import pyarrow as pa

    manifest = json.loads((small_cache / "manifest.json").read_text())
    assert set(manifest["part_sha256"]) == set(manifest["parts"])

    altered = tmp_path / "altered"
    shutil.copytree(small_cache, altered)
    part = altered / manifest["parts"][0]
    table = pq.read_table(part)
    elbo = [v * 0.5 for v in table["ref_chosen_elbo"].to_pylist()]  # still a valid Parquet file
    pq.write_table(table.set_column(table.schema.get_field_index("ref_chosen_elbo"), "ref_chosen_elbo",
                                    pa.array(elbo, pa.float64())), part)
    with pytest.raises(UserError, match=rf"{part.name}: part file differs from the checksum.*rerun score-ref"):
        open_cache(altered).table()

    cut = tmp_path / "cut"
    shutil.copytree(small_cache, cut)
    part = cut / manifest["parts"][-1]
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    res = CliRunner().invoke(app, ["train", str(cut), "--out", str(tmp_path / "run"), "--device", "cpu",
                                   "--max-steps", "1", "--no-progress"])
    assert res.exit_code == 1 and len(res.stderr.strip().splitlines()) == 1, res.output
    assert f"{part.name}: part file differs from the checksum" in res.stderr and "rerun score-ref" in res.stderr

    manifest.pop("part_sha256")  # a cache without checksums: a cut part is still one line, not a traceback
    (cut / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=rf"{part.name}: part file does not read as Parquet"):
        open_cache(cut).table()


def test_truncation_is_counted_and_an_all_truncated_run_is_refused(small_pairs, tmp_path):
    from pipeline.data.tokenize import tokenize_pair
    from pipeline.models import load_model

    _, tok = load_model("micro")
    rows = read_pairs(small_pairs).to_pylist()
    full = sorted(len(t.prompt_ids) + max(len(t.chosen_ids), len(t.rejected_ids))
                  for t in (tokenize_pair(tok, r, 10**6, use_chat_template=True) for r in rows))
    limit = full[0]  # the shortest pairs fit, the others are cut
    expected = sum(n > limit for n in full)
    assert 0 < expected < len(rows)
    res = run(_cfg(small_pairs, tmp_path / "half", max_length=limit, samples=1, draws=1, pairs_per_part=64))
    assert res.truncated == expected
    assert json.loads((tmp_path / "half" / "manifest.json").read_text())["truncated"] == expected
    reused = run(_cfg(small_pairs, tmp_path / "half", max_length=limit, samples=1, draws=1, pairs_per_part=64))
    assert reused.reused and reused.truncated == expected

    cli = CliRunner().invoke(app, ["score-ref", str(small_pairs), "--model", "micro", "--out", str(tmp_path / "one"),
                                   "--max-length", "1", "--device", "cpu", "--no-progress"])
    assert cli.exit_code == 1 and "all 20 pairs are longer than --max-length 1" in cli.stderr
    assert len(cli.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "one" / "manifest.json").exists()


def test_resume_with_another_pairs_per_part_is_refused(small_pairs, tmp_path):
    out = tmp_path / "c"
    # The fingerprint records the resolved rendering rule (micro's tokenizer has a chat template).
    cfg = dict(pairs=small_pairs, model="micro", out=out, samples=2, device="cpu", progress=False, chat_template=True)
    run(ScoreRefConfig(pairs_per_part=8, **cfg))
    (out / "manifest.json").unlink()  # as if killed before the end, with every part written
    (out / "fingerprint.json").write_text(json.dumps(_fingerprint_of(small_pairs, cfg)))
    for p in sorted(out.glob("part-*.parquet"))[1:]:
        p.unlink()
    kept = pq.read_metadata(sorted(out.glob("part-*.parquet"))[0]).num_rows
    with pytest.raises(UserError, match=r"holds other pairs than this run assigns to part 0; resume with the "
                                        r"--pairs-per-part"):
        run(ScoreRefConfig(pairs_per_part=1, **cfg))  # parts hold one split each: part 0 differs at size 1
    result = run(ScoreRefConfig(pairs_per_part=8, **cfg))  # the original layout resumes
    assert result.pairs == 20 and result.scored_now == 20 - kept


def _fingerprint_of(pairs, cfg):
    from pipeline.data.pairsfile import pairs_sha256, read_pairs
    from pipeline.models import load_model, model_identity, tokenizer_identity
    from pipeline.refcache.fingerprint import build_fingerprint

    _, tok = load_model("micro")
    return build_fingerprint(ScoreRefConfig(**cfg), model_identity("micro"), tokenizer_identity(tok),
                             pairs_sha256(read_pairs(pairs)))


def test_shared_pair_masks_give_both_sides_one_seed_and_at_one_length_the_same_masks(small_pairs, small_cache,
                                                                                      tmp_path):
    shared = _content_of(run(_cfg(small_pairs, tmp_path / "shared", pair_masks="shared", pad_to=24)))
    padded = _content_of(run(_cfg(small_pairs, tmp_path / "padded", pad_to=24)))
    for row in shared:
        assert row["chosen_seeds"] == row["rejected_seeds"] and len(set(row["chosen_seeds"])) == 2  # one per draw
        assert row["chosen_len"] == row["rejected_len"]
        assert row["chosen_mask_counts"] == row["rejected_mask_counts"]
        assert row["chosen_timesteps"] == row["rejected_timesteps"]
    assert all(r["chosen_seeds"] != r["rejected_seeds"] for r in padded)
    # the chosen side of a shared cache is masked differently from an independent one: not a relabelled copy
    assert [r["chosen_seeds"] for r in shared] != [r["chosen_seeds"] for r in padded]


def test_independent_pair_masks_leave_the_fingerprint_as_before(small_pairs):
    """Every cache before the setting drew independent masks: their fingerprints (and digests) must still match."""
    base = dict(pairs=small_pairs, model="micro", out="x", samples=3, draws=2, device="cpu")
    independent = _fingerprint_of(small_pairs, base)
    assert "pair_masks" not in independent
    assert _fingerprint_of(small_pairs, {**base, "pair_masks": "shared"}) == {**independent, "pair_masks": "shared"}


def _content_of(result):
    return _content(Path(result.out))
