"""score-ref's work: the frozen reference model scores every pair on its seeded masks, part by part, into a cache.

For every pair, side (chosen/rejected) and draw, the masks come from
``sample_masks(L, n, side_seed(seed, pair_id, side, draw, pair_masks))`` (one seed
per pair and draw for both sides under ``pair_masks: shared``); the cache keeps
the seeds, mask counts and per-sample terms, so ``train`` can replay exactly
the same masks on the policy (antithetic sampling) without loading the
reference model.

Work is cut into parts of ``pairs_per_part`` pairs in a fixed order (pairs
sorted by length, so batches carry little padding). Each part is written
atomically when done, so a killed run resumes at the first missing part;
under ``accelerate launch`` part i belongs to process i mod world size, so
the cache content does not depend on the number of processes.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, replace
from typing import Any

import pyarrow as pa

from pipeline.core.config import config_to_dict
from pipeline.core.devices import process_state, resolve_device
from pipeline.core.errors import UserError
from pipeline.core.progress import progress_bar
from pipeline.core.schemas import (
    IDS_COLUMNS,
    LENGTH_COLUMNS,
    MASK_COUNT_COLUMNS,
    PAIR_ID_COLUMN,
    REF_ELBO_COLUMNS,
    REF_MARGIN_COLUMN,
    REF_TERM_COLUMNS,
    SCORES_SCHEMA,
    SEED_COLUMNS,
    SIDES,
    SPLIT_COLUMN,
    TIMESTEP_COLUMNS,
    TRUNCATED_COLUMN,
    split_of,
)
from pipeline.data.pairsfile import pairs_sha256, read_pairs
from pipeline.data.prompts import resolve_chat_template
from pipeline.data.tokenize import tokenize_pair
from pipeline.estimator.diffusion import forward_batches, masked_request, side_seed
from pipeline.refcache import writer
from pipeline.refcache.fingerprint import build_fingerprint, fingerprint_digest
from pipeline.refcache.manifest import CacheManifest
from pipeline.refcache.reader import existing_parts


@dataclass
class ScoreRefResult:
    pairs: int
    tokens: int
    seconds: float
    padding_fraction: float
    out: str
    fingerprint: str
    scored_now: int = 0
    """Pairs scored by this invocation (0 when a finished cache was found)."""
    reused: bool = False
    """True when any pair's scores were found already written (a finished cache, or the parts before a crash)."""
    reused_pairs: int = 0
    """Pairs whose scores were found already written, not scored by this invocation."""
    identical_after_truncation: int = 0
    """Pairs whose chosen and rejected ids are equal once truncated (train skips them)."""
    truncated: int = 0
    """Pairs cut to --max-length (some tokens dropped)."""


def truncation_warning(truncated: int, pairs: int, cfg) -> str:
    """The line that says most pairs lose tokens (the scores then describe shortened answers)."""
    limits = [f"--max-length {cfg.max_length}"] + [f"{name} {value}" for name, value in (
        ("max_prompt_length", cfg.max_prompt_length), ("max_completion_length", cfg.max_completion_length))
        if value is not None]
    return (f"warning: {truncated} of {pairs} pairs ({truncated / pairs:.0%}) are truncated to {', '.join(limits)}: "
            "their scores describe shortened answers; raise the limit to score them whole")


def _tokenize(tokenizer, row: dict, cfg):
    return tokenize_pair(tokenizer, row, cfg.max_length, use_chat_template=cfg.chat_template, pad_to=cfg.pad_to,
                         max_prompt_length=cfg.max_prompt_length, max_completion_length=cfg.max_completion_length)


def _masked_record(row: dict, tok, cfg, requests: list, layout: list, index: int) -> dict[str, Any]:
    """A cache row's ids, lengths, seeds and masks (its terms to come); its requests appended to ``requests``."""
    ids = {part: list(getattr(tok, f"{part}_ids")) for part in IDS_COLUMNS}
    rec = {PAIR_ID_COLUMN: row["pair_id"], SPLIT_COLUMN: split_of(row.get("split")),
           TRUNCATED_COLUMN: bool(tok.truncated), **{IDS_COLUMNS[part]: v for part, v in ids.items()},
           **{col: len(ids[part]) for part, col in zip(IDS_COLUMNS, LENGTH_COLUMNS)}}
    for side in SIDES:
        seeds = [side_seed(cfg.seed, row["pair_id"], side, draw, cfg.pair_masks) for draw in range(cfg.draws)]
        drawn = [masked_request(ids["prompt"], ids[side], cfg.samples, seed, scheme=cfg.scheme, eps=cfg.eps)
                 for seed in seeds]
        rec[SEED_COLUMNS[side]] = seeds
        rec[MASK_COUNT_COLUMNS[side]] = [ms.counts.tolist() for _, ms in drawn]
        rec[TIMESTEP_COLUMNS[side]] = [ms.timesteps.tolist() for _, ms in drawn]
        requests += [request for request, _ in drawn]
        layout += [(index, side)] * len(drawn)
    return rec


def score_part(model, tokenizer, rows: list[dict], cfg, stats: dict) -> pa.Table:
    """Score one part's pairs; returns its SCORES_SCHEMA table. Pure apart from the model call."""
    from pipeline.estimator.replay import mean_of_draws, terms_by_row
    from pipeline.models.numerics import autocast

    requests, layout, records = [], [], []
    for row in rows:
        tok = _tokenize(tokenizer, row, cfg)
        if not tok.prompt_ids and getattr(model, "logits_shift", False):
            raise UserError(f"pair {row['pair_id']}: truncation to --max-length {cfg.max_length} left no prompt "
                            "token, and this model predicts each token from the one before it; raise --max-length")
        records.append(_masked_record(row, tok, cfg, requests, layout, len(records)))

    # The layout of these requests (row, side, draw) and batch_tokens are what eval replays
    # (pipeline.estimator.replay.part_requests, on the same masked_request) to reproduce these terms exactly.
    device = next(model.parameters()).device
    terms = terms_by_row(model, tokenizer, requests, layout, len(records), batch_tokens=cfg.batch_tokens,
                         autocast=autocast(device, cfg.mixed_precision))
    for lengths in forward_batches(requests, cfg.batch_tokens):  # real and padded tokens of the forward passes
        stats["real_tokens"] += sum(lengths)
        stats["padded_tokens"] += max(lengths) * len(lengths) - sum(lengths)
    for rec, by_side in zip(records, terms):
        for side in SIDES:
            for values in by_side[side]:
                if not all(math.isfinite(v) for v in values):
                    raise UserError(f"reference score for pair {rec[PAIR_ID_COLUMN]} ({side}) is not finite: "
                                    f"{values}; check the model weights and --dtype")
            rec[REF_TERM_COLUMNS[side]] = by_side[side]
            rec[REF_ELBO_COLUMNS[side]] = mean_of_draws(by_side[side])
        rec[REF_MARGIN_COLUMN] = rec[REF_ELBO_COLUMNS["chosen"]] - rec[REF_ELBO_COLUMNS["rejected"]]
    return pa.Table.from_pylist(records, schema=SCORES_SCHEMA)


def survey_pairs(table: pa.Table, tokenizer, cfg, is_main: bool) -> list[int]:
    """Each pair's scored length (prompt + its longer response, after truncation), refusing a file whose pairs
    all lose their text or their difference to truncation; warns when most are truncated. Lengths only (not
    the ids) are kept for the whole file, so memory is bounded by one part."""
    lengths, truncated, identical = [], 0, 0
    for batch in table.to_batches(max_chunksize=1024):
        for row in batch.to_pylist():
            tok = _tokenize(tokenizer, row, cfg)
            lengths.append(len(tok.prompt_ids) + max(len(tok.chosen_ids), len(tok.rejected_ids)))
            truncated += bool(tok.truncated)
            identical += tok.chosen_ids == tok.rejected_ids
    # Scoring pairs that all lost their difference (or all their text) to truncation is hours spent on nothing.
    # (TRL's max_prompt_length / max_completion_length ask for truncation: then it is only warned of, below)
    if truncated == len(lengths) and cfg.max_prompt_length is None and cfg.max_completion_length is None:
        raise UserError(f"{cfg.pairs}: all {truncated} pairs are longer than --max-length {cfg.max_length} tokens "
                        "and would be truncated; raise --max-length")
    if identical == len(lengths):
        raise UserError(f"{cfg.pairs}: all {identical} pairs have identical chosen and rejected tokens after "
                        f"truncation to --max-length {cfg.max_length}; raise --max-length")
    if is_main and truncated * 2 > len(lengths):
        print(truncation_warning(truncated, len(lengths), cfg), file=sys.stderr)
    return lengths


def _score_parts(model, tokenizer, table: pa.Table, parts: list[list[int]], mine: list[int], cfg,
                 show: bool) -> tuple[dict[str, int], int]:
    """Score and write this process's missing parts; (token statistics of its forward passes, pairs scored)."""
    stats = {"padded_tokens": 0, "real_tokens": 0}
    scored = 0
    with progress_bar("score-ref", sum(len(parts[i]) for i in mine), enabled=cfg.progress and show,
                      extra="{task.fields[tps]}") as bar:
        for i in mine:
            t0 = time.perf_counter()
            rows = table.take(parts[i]).to_pylist()
            part = score_part(model, tokenizer, rows, cfg, stats)
            writer.write_part(cfg.out, i, part)
            scored += len(rows)
            dt = max(time.perf_counter() - t0, 1e-9)
            tokens = writer.scored_tokens(part.select(list(LENGTH_COLUMNS)).to_pylist(), cfg.samples, cfg.draws)
            bar.advance(len(rows), tps=f"{tokens / dt:,.0f} tok/s")
    return stats, scored


def _across_processes(value: float, state) -> float:
    """Sum of ``value`` over processes (gloo or nccl)."""
    import torch
    from accelerate.utils import reduce

    return float(reduce(torch.tensor([float(value)], dtype=torch.float64, device=state.device), "sum").item())


def _read_input(cfg) -> pa.Table:
    table = read_pairs(cfg.pairs)
    if cfg.limit:
        table = table.slice(0, cfg.limit)
    if table.num_rows == 0:
        raise UserError(f"{cfg.pairs}: no pairs to score")
    return table


def _load_reference(cfg, check_memory):
    """The reference model in the cache's numerics (frozen), its tokenizer, and ``cfg`` with the chat template
    resolved; ``check_memory(cfg, device)`` first, on CUDA with ``plan`` (the stage's: lldm-dpo plan's check)."""
    from pipeline.models import load
    from pipeline.models.numerics import Numerics

    device = resolve_device(cfg.device)
    if cfg.mixed_precision == "fp16" and device.type != "cuda":
        raise UserError("--mixed-precision fp16 needs CUDA; use bf16 or no")
    if cfg.plan and device.type == "cuda" and check_memory is not None:
        check_memory(cfg, device)
    model, tokenizer = load(cfg.model, Numerics(cfg.dtype, cfg.mixed_precision, cfg.load_in_4bit), device,
                            trust_remote_code=cfg.trust_remote_code)
    model.eval().requires_grad_(False)
    return model, tokenizer, replace(cfg, chat_template=resolve_chat_template(tokenizer, cfg.chat_template))


def _reused(manifest: CacheManifest, cfg, digest: str, start: float, is_main: bool) -> ScoreRefResult:
    """The result of a run that found its cache finished."""
    if is_main and manifest.truncated * 2 > manifest.pairs:
        print(truncation_warning(manifest.truncated, manifest.pairs, cfg), file=sys.stderr)
    return ScoreRefResult(manifest.pairs, manifest.tokens, time.perf_counter() - start, manifest.padding_fraction,
                          str(cfg.out), digest, scored_now=0, reused=True, reused_pairs=manifest.pairs,
                          identical_after_truncation=manifest.identical_after_truncation,
                          truncated=manifest.truncated)


def score_to_cache(cfg, check_memory=None) -> ScoreRefResult:
    """Score ``cfg.pairs`` (score-ref's config) into the cache ``cfg.out``: reuse a finished cache made with the
    same settings, resume an interrupted one, or score afresh; the manifest is written last."""
    from pipeline.models import model_identity, tokenizer_identity

    start, state = time.perf_counter(), process_state(cfg.device)
    is_main = state.is_main_process
    table = _read_input(cfg)
    writer.claim_folder(cfg.out)
    model, tokenizer, cfg = _load_reference(cfg, check_memory)
    fingerprint = build_fingerprint(cfg, model_identity(cfg.model), tokenizer_identity(tokenizer),
                                    pairs_sha256(table))  # by content: not the folder the input was named from
    digest = fingerprint_digest(fingerprint)
    status, manifest = writer.check_existing(cfg.out, fingerprint, cfg.overwrite, is_main)
    state.wait_for_everyone()
    if status == "done":
        return _reused(manifest, cfg, digest, start, is_main)
    if is_main:
        writer.mark_in_progress(cfg.out, fingerprint)
    state.wait_for_everyone()

    pair_ids, lengths = table.column("pair_id").to_pylist(), survey_pairs(table, tokenizer, cfg, is_main)
    splits = [split_of(s) for s in table.column("split").to_pylist()] if "split" in table.column_names else None
    parts = writer.plan_parts(lengths, pair_ids, cfg.pairs_per_part, splits)
    done = existing_parts(cfg.out)
    writer.check_done_parts(done, parts, pair_ids)
    mine = [i for i in range(len(parts)) if i % state.num_processes == state.process_index and i not in done]
    stats, scored = _score_parts(model, tokenizer, table, parts, mine, cfg, is_main)

    state.wait_for_everyone()
    done = existing_parts(cfg.out)
    if len(done) != len(parts):
        raise UserError(f"{cfg.out}: {len(parts) - len(done)} part files missing after scoring; rerun to resume")
    totals = writer.cache_totals(done, cfg.samples, cfg.draws)
    # Padding is only known for the parts scored now; a fully resumed run reports what it saw.
    seen = stats["real_tokens"] + stats["padded_tokens"]
    padding = stats["padded_tokens"] / seen if seen else 0.0
    if state.num_processes > 1:
        padding = _across_processes(padding, state) / state.num_processes
        scored = int(_across_processes(scored, state))
    if is_main:
        writer.write_manifest(cfg.out, done, fingerprint=fingerprint, digest=digest, totals=totals,
                              padding_fraction=padding, config=config_to_dict(cfg), processes=state.num_processes)
    state.wait_for_everyone()
    return ScoreRefResult(totals["pairs"], totals["tokens"], time.perf_counter() - start, padding, str(cfg.out),
                          digest, scored_now=scored, reused=scored < totals["pairs"],
                          reused_pairs=totals["pairs"] - scored,
                          identical_after_truncation=totals["identical_after_truncation"], truncated=totals["truncated"])
