"""``lldm-dpo score-ref``: run the frozen reference model once, cache its ELBO terms.

For every pair, side (chosen/rejected) and draw, the masks come from
``sample_masks(L, n, mask_seed(seed, pair_id, side, draw))``; the cache keeps
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

import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import __version__
from pipeline.cli.commands import print_summary, stage_command, summary_dict
from pipeline.core.atomic import (
    atomic_path,
    check_replaceable,
    check_writable,
    clear_owned,
    file_sha256,
    remove_owned,
    sweep_stale,
    write_json_atomic,
)
from pipeline.core.config import check_device, check_ranges, config_to_dict, require_choice
from pipeline.core.devices import DTYPE_NAMES, PRECISION_NAMES, process_state, resolve_device
from pipeline.core.errors import CacheMismatch, ConfigError, UserError
from pipeline.core.lazy import deferred
from pipeline.core.lock import output_lock
from pipeline.core.progress import progress_bar
from pipeline.core.schemas import SCORES_MANIFEST, SCORES_SCHEMA, SIDES
from pipeline.data.pairsfile import pairs_sha256, read_pairs
from pipeline.data.prompts import PROMPT_RENDERER, resolve_chat_template
from pipeline.data.tokenize import tokenize_pair
from pipeline.estimator.diffusion import SCHEMES, forward_batches, mask_seed, masked_request
from pipeline.refcache.store import (
    IN_PROGRESS,
    PART_PATTERN,
    describe_difference,
    existing_parts,
    fingerprint_differences,
    fingerprint_digest,
    part_name,
    read_part,
)

# torch and the modules on it (numerics, replay, models) load when the command runs: --help and a refused flag
# need only ScoreRefConfig
torch = deferred("torch")

ESTIMATOR_VERSION = "elbo-masked-v1"
"""Bump when the estimator's arithmetic changes: old caches then no longer match."""


# samples and draws are bounded: each response holds samples x draws masks of its length (a typo's 10**12 would
# be terabytes), and the estimator's variance falls as 1/n: beyond a few thousand nothing changes
RANGES = {"samples": "[1, 4096]", "draws": "[1, 1024]", "seed": "[0, inf)", "eps": "(0, 1)", "max_length": "[1, inf)",
          "pad_to": "[0, inf)", "batch_tokens": "[1, inf)", "pairs_per_part": "[1, inf)", "limit": "[0, inf)",
          "max_prompt_length": "[0, inf)", "max_completion_length": "[2, inf)"}
"""The valid interval of every numeric field (checked first in __post_init__)."""


@dataclass
class ScoreRefConfig:
    pairs: Path = Path("data/out/pairs.arrow")
    """Pairs file written by ``lldm-dpo ingest`` (Arrow IPC)."""
    model: str = "tiny"
    """Reference model: a preset name, a local checkpoint folder (LLaDA or another masked diffusion LM)."""
    out: Path = Path("cache/ref-scores")
    """Cache folder: Parquet part files plus manifest.json."""
    samples: int = 8
    """Monte Carlo samples n per response and draw (one mask per timestep, VRPO's allocation)."""
    draws: int = 1
    """Independent mask sets per response; training epoch e replays draw e mod draws."""
    seed: int = 0
    """Global mask seed; masks depend only on (seed, pair_id, side, draw)."""
    scheme: str = "l_over_L"
    """Mask-count scheme: l_over_L (LLaDA's stratified counts, weight L/l) or one_over_t (t ~ U(eps,1], weight 1/t)."""
    eps: float = 1e-3
    """Lower bound of t for the one_over_t scheme."""
    max_length: int = 1024
    """Longest prompt + response in tokens; longer pairs are truncated (prompt first) and flagged."""
    max_prompt_length: Optional[int] = None
    """TRL's: the prompt keeps its last N tokens (before max_length applies); none: no limit of its own."""
    max_completion_length: Optional[int] = None
    """TRL's: each response keeps its first N tokens, the last replaced by EOS; none: no limit of its own."""
    pad_to: int = 0
    """Pad every response with EOS to this many tokens, the padding scored as response (as LLaDA's SFT pads and
    ``lldm-dpo sft --pad-response-to`` does): set it to the generation length the responses were sampled with,
    so they are scored and trained in the shape the model generates. 0 = no padding. In the fingerprint."""
    chat_template: Optional[bool] = None
    """Render prompts with the tokenizer's chat template (a text prompt as one user turn, a text response as the
    assistant's turn); false: raw text. Default: on when the tokenizer has a template. Recorded in the fingerprint."""
    batch_tokens: int = 16384
    """Token budget of one forward pass (padded rows x length)."""
    pairs_per_part: int = 64
    """Pairs per Parquet part file: the unit of resumption after a crash."""
    dtype: str = "float32"
    """Reference model weights dtype: float32, bfloat16 or float16 (bfloat16 under load_in_4bit). In the
    fingerprint: train and eval run the policy in the cache's numerics by default."""
    mixed_precision: str = "no"
    """Autocast of the forward passes as accelerate's mixed precision: no, bf16 or fp16 (fp16 needs CUDA); score
    in the numerics the policy will train in (e.g. float32 weights with bf16 autocast)."""
    load_in_4bit: bool = False
    """Quantize the reference's block projections to 4-bit NF4 with bitsandbytes (CPU or CUDA), as train's QLoRA
    base."""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto (accelerate's device for this process)."""
    limit: int = 0
    """Score only the first N pairs of the file (0 = all)."""
    trust_remote_code: bool = False
    """Allow a non-LLaDA checkpoint to run its own modeling code."""
    overwrite: bool = False
    """Replace a cache made with different settings instead of refusing."""
    progress: bool = True
    """Show a progress bar."""
    plan: bool = True
    """On CUDA, plan the peak memory first and stop with the largest settings that fit (lldm-dpo plan)."""

    def __post_init__(self):
        self.pairs, self.out = Path(self.pairs), Path(self.out)
        check_ranges(self, RANGES)
        check_device(self.device)
        require_choice("scheme", self.scheme, SCHEMES)
        require_choice("dtype", self.dtype, DTYPE_NAMES)
        require_choice("mixed_precision", self.mixed_precision, PRECISION_NAMES)
        if self.load_in_4bit and self.dtype == "float32":
            self.dtype = "bfloat16"  # the 4-bit base computes in bfloat16, as in train
        if self.pad_to > self.max_length:
            raise ConfigError(f"pad_to ({self.pad_to}) exceeds max_length ({self.max_length})")
        if self.load_in_4bit and self.dtype != "bfloat16":
            raise ConfigError(f"load_in_4bit computes in bfloat16, got dtype '{self.dtype}'")


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


def truncation_warning(truncated: int, pairs: int, cfg: ScoreRefConfig) -> str:
    """The line that says most pairs lose tokens (the scores then describe shortened answers)."""
    limits = [f"--max-length {cfg.max_length}"] + [f"{name} {value}" for name, value in (
        ("max_prompt_length", cfg.max_prompt_length), ("max_completion_length", cfg.max_completion_length))
        if value is not None]
    return (f"warning: {truncated} of {pairs} pairs ({truncated / pairs:.0%}) are truncated to {', '.join(limits)}: "
            "their scores describe shortened answers; raise the limit to score them whole")


def build_fingerprint(cfg: ScoreRefConfig, model_identity: Any, tokenizer_identity: str, pairs_sha: str) -> dict[str, Any]:
    """Everything that changes a score; ``train`` and reruns compare field by field."""
    return {
        "model": model_identity,
        "tokenizer": tokenizer_identity,
        "chat_template": cfg.chat_template,
        "prompt_renderer": PROMPT_RENDERER,
        "max_length": cfg.max_length,
        # absent (None) in caches made before these existed: the same as not given
        "max_prompt_length": cfg.max_prompt_length,
        "max_completion_length": cfg.max_completion_length,
        "pad_to": cfg.pad_to,
        "estimator": ESTIMATOR_VERSION,
        "scheme": cfg.scheme,
        "eps": cfg.eps if cfg.scheme == "one_over_t" else None,
        "samples": cfg.samples,
        "draws": cfg.draws,
        "seed": cfg.seed,
        "dtype": cfg.dtype,
        "mixed_precision": cfg.mixed_precision,
        "load_in_4bit": cfg.load_in_4bit,
        "pairs_sha256": pairs_sha,
        "limit": cfg.limit,
        "package_version": __version__,
    }


def _drop_altered_parts(out: Path, manifest: dict[str, Any], fingerprint: dict[str, Any], is_main: bool) -> bool:
    """A finished cache whose parts no longer match the manifest's checksums is reopened: the altered or
    missing parts are removed (they are score-ref's own) and rescored, never reused. True when reopened."""
    sums = manifest.get("part_sha256") or {}
    bad = [name for name in manifest.get("parts", []) if not (out / name).is_file()
           or (name in sums and file_sha256(out / name) != sums[name])]
    if not bad:
        return False
    if is_main:
        write_json_atomic(out / IN_PROGRESS, fingerprint)
        for name in bad:
            remove_owned(out / name)
        remove_owned(out / SCORES_MANIFEST)
    return True


def _check_existing(out: Path, fingerprint: dict[str, Any], overwrite: bool, is_main: bool) -> tuple[str, Any]:
    """('done', the manifest), ('resume', None) or ('fresh', None); refuse or clear a cache made differently."""
    marker = next((m for m in (SCORES_MANIFEST, IN_PROGRESS) if (out / m).exists()), None)
    if marker is None:
        parts = existing_parts(out)
        if not parts and out.exists() and any(not p.name.startswith(".") for p in out.iterdir()):
            raise UserError(f"{out}: folder exists and is not a reference-score cache; choose another --out")
        if is_main:  # parts without their manifest (or marker) say nothing of the settings that made them: not reused
            for path in parts.values():
                remove_owned(path)
        return "fresh", None
    found = manifest = json.loads((out / marker).read_text())
    if marker == SCORES_MANIFEST:
        found = manifest.get("fingerprint", manifest)
    diffs = fingerprint_differences(fingerprint, found)
    if not diffs:
        if marker == IN_PROGRESS or _drop_altered_parts(out, manifest, fingerprint, is_main):
            return "resume", None
        return "done", manifest
    if not overwrite:
        detail = (f"{out}: existing cache was made with different settings ("
                  + "; ".join(describe_difference(fingerprint, found, d) for d in diffs[:3]) + ")")
        raise CacheMismatch(detail + "; use --overwrite to replace it or choose another --out", detail)
    if is_main:
        left = clear_owned(out)  # only what score-ref wrote; the user's files in the folder stay
        stale = [p.name for p in left if PART_PATTERN.match(p.name) or p.name in (SCORES_MANIFEST, IN_PROGRESS)]
        if stale:  # never mix parts made with other settings into the new cache
            raise UserError(f"{out}: {stale[0]} was not recorded as written by score-ref (an older version's?); "
                            "remove the old cache yourself or choose another --out")
    return "fresh", None


def score_part(model, tokenizer, rows: list[dict], cfg: ScoreRefConfig, stats: dict) -> pa.Table:
    """Score one part's pairs; returns its SCORES_SCHEMA table. Pure apart from the model call."""
    from pipeline.estimator.replay import mean_of_draws, terms_by_row
    from pipeline.models.numerics import autocast

    requests, layout, records = [], [], []
    for row in rows:
        tok = tokenize_pair(tokenizer, row, cfg.max_length, use_chat_template=cfg.chat_template, pad_to=cfg.pad_to,
                            max_prompt_length=cfg.max_prompt_length, max_completion_length=cfg.max_completion_length)
        if not tok.prompt_ids and getattr(model, "logits_shift", False):
            raise UserError(f"pair {row['pair_id']}: truncation to --max-length {cfg.max_length} left no prompt "
                            "token, and this model predicts each token from the one before it; raise --max-length")
        ids = {f"{part}_ids": list(getattr(tok, f"{part}_ids")) for part in ("prompt", *SIDES)}
        rec = {"pair_id": row["pair_id"], "split": row.get("split") or "train", "truncated": bool(tok.truncated),
               **ids, **{name.replace("_ids", "_len"): len(value) for name, value in ids.items()}}
        for side in SIDES:
            seeds = [mask_seed(cfg.seed, row["pair_id"], side, draw) for draw in range(cfg.draws)]
            drawn = [masked_request(rec["prompt_ids"], rec[f"{side}_ids"], cfg.samples, seed, scheme=cfg.scheme,
                                    eps=cfg.eps) for seed in seeds]
            rec[f"{side}_seeds"] = seeds
            rec[f"{side}_mask_counts"] = [ms.counts.tolist() for _, ms in drawn]
            rec[f"{side}_timesteps"] = [ms.timesteps.tolist() for _, ms in drawn]
            requests += [request for request, _ in drawn]
            layout += [(len(records), side)] * len(drawn)
        records.append(rec)

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
                    raise UserError(f"reference score for pair {rec['pair_id']} ({side}) is not finite: {values}; "
                                    "check the model weights and --dtype")
            rec[f"ref_{side}_terms"] = by_side[side]
            rec[f"ref_{side}_elbo"] = mean_of_draws(by_side[side])
        rec["ref_margin"] = rec["ref_chosen_elbo"] - rec["ref_rejected_elbo"]
    return pa.Table.from_pylist(records, schema=SCORES_SCHEMA)


def _check_done_parts(done: dict[int, Path], parts: list[list[int]], pair_ids: list[str]) -> None:
    """Parts on disk from an interrupted run must hold exactly the pairs this plan gives them."""
    for i, path in sorted(done.items()):
        found = sorted(read_part(path, columns=["pair_id"])["pair_id"].to_pylist())
        planned = sorted(pair_ids[j] for j in parts[i]) if i < len(parts) else []
        if found != planned:
            raise UserError(f"{path}: holds other pairs than this run assigns to part {i}; resume with the "
                            "--pairs-per-part of the interrupted run, or pass --overwrite to start over")


def plan_parts(lengths: list[int], pair_ids: list[str], pairs_per_part: int,
               splits: list[str] | None = None) -> list[list[int]]:
    """Row indices of each part: one split per part (eval rescores a split's parts in their exact layout),
    longest pairs first within a split (errors of memory show at once), ties by pair_id."""
    splits = splits or ["train"] * len(lengths)
    parts = []
    for split in sorted(set(splits)):
        rows = [i for i in range(len(lengths)) if splits[i] == split]
        order = sorted(rows, key=lambda i: (-lengths[i], pair_ids[i]))
        parts += [order[i:i + pairs_per_part] for i in range(0, len(order), pairs_per_part)]
    return parts


def run(cfg: ScoreRefConfig) -> ScoreRefResult:
    """The stage, holding its output's lock (a second run into the same place refuses, naming the first)."""
    with output_lock(cfg.out, "score-ref", folder=True):
        return _run(cfg)


def _run(cfg: ScoreRefConfig) -> ScoreRefResult:
    from pipeline.models import load, model_identity, tokenizer_identity
    from pipeline.models.numerics import Numerics

    start = time.perf_counter()
    state = process_state(cfg.device)
    is_main = state.is_main_process
    table = read_pairs(cfg.pairs)
    if cfg.limit:
        table = table.slice(0, cfg.limit)
    if table.num_rows == 0:
        raise UserError(f"{cfg.pairs}: no pairs to score")
    check_writable(cfg.out, "reference-score cache")
    # The cache's own names in --out (manifest, marker, parts) must be score-ref's: a user's file is refused.
    for path in [cfg.out / SCORES_MANIFEST, cfg.out / IN_PROGRESS, *existing_parts(cfg.out).values()]:
        check_replaceable(path, "--out")
    sweep_stale(cfg.out)  # temporary files a killed run left (provably its own, its process gone)

    device = resolve_device(cfg.device)
    if cfg.mixed_precision == "fp16" and device.type != "cuda":
        raise UserError("--mixed-precision fp16 needs CUDA; use bf16 or no")
    if cfg.plan and device.type == "cuda":  # every pair planned at --max-length: the longest parts are scored first
        # (the planner imports the trainer and peft: seconds a CPU run, which check_start never checks, skips)
        from pipeline.plan import Shape, check_start

        check_start("score-ref", cfg, Shape(cfg.samples, cfg.max_length, cfg.max_length // 4), device)
    model, tokenizer = load(cfg.model, Numerics(cfg.dtype, cfg.mixed_precision, cfg.load_in_4bit), device,
                            trust_remote_code=cfg.trust_remote_code)
    model.eval().requires_grad_(False)
    cfg = replace(cfg, chat_template=resolve_chat_template(tokenizer, cfg.chat_template))

    fingerprint = build_fingerprint(cfg, model_identity(cfg.model), tokenizer_identity(tokenizer),
                                    pairs_sha256(table))  # by content: not the folder the input was named from
    digest = fingerprint_digest(fingerprint)
    status, manifest = _check_existing(cfg.out, fingerprint, cfg.overwrite, is_main)
    state.wait_for_everyone()
    if status == "done":
        if is_main and manifest.get("truncated", 0) * 2 > manifest["pairs"]:
            print(truncation_warning(manifest["truncated"], manifest["pairs"], cfg), file=sys.stderr)
        return ScoreRefResult(manifest["pairs"], manifest["tokens"], time.perf_counter() - start,
                              manifest["padding_fraction"], str(cfg.out), digest, scored_now=0, reused=True,
                              reused_pairs=manifest["pairs"],
                              identical_after_truncation=manifest.get("identical_after_truncation", 0),
                              truncated=manifest.get("truncated", 0))
    if is_main:
        cfg.out.mkdir(parents=True, exist_ok=True)
        if not (cfg.out / IN_PROGRESS).exists():
            write_json_atomic(cfg.out / IN_PROGRESS, fingerprint, record=True)
    state.wait_for_everyone()

    # Lengths only (not the ids) are kept for the whole file, so memory is bounded by one part.
    lengths, pair_ids = [], table.column("pair_id").to_pylist()
    splits = [s or "train" for s in table.column("split").to_pylist()] if "split" in table.column_names else None
    truncated = identical = 0
    for batch in table.to_batches(max_chunksize=1024):
        for row in batch.to_pylist():
            tok = tokenize_pair(tokenizer, row, cfg.max_length, use_chat_template=cfg.chat_template, pad_to=cfg.pad_to,
                                max_prompt_length=cfg.max_prompt_length,
                                max_completion_length=cfg.max_completion_length)
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
    parts = plan_parts(lengths, pair_ids, cfg.pairs_per_part, splits)
    done = existing_parts(cfg.out)
    _check_done_parts(done, parts, pair_ids)
    mine = [i for i in range(len(parts)) if i % state.num_processes == state.process_index and i not in done]

    stats = {"padded_tokens": 0, "real_tokens": 0}
    scored = 0
    with progress_bar("score-ref", sum(len(parts[i]) for i in mine), enabled=cfg.progress and is_main,
                      extra="{task.fields[tps]}") as bar:
        for i in mine:
            t0 = time.perf_counter()
            rows = table.take(parts[i]).to_pylist()
            part = score_part(model, tokenizer, rows, cfg, stats)
            with atomic_path(cfg.out / part_name(i), record=True) as tmp:
                pq.write_table(part, tmp)
            scored += len(rows)
            dt = max(time.perf_counter() - t0, 1e-9)
            bar.advance(len(rows), tps=f"{_tokens(part.select(_LENGTHS).to_pylist(), cfg) / dt:,.0f} tok/s")

    state.wait_for_everyone()
    done = existing_parts(cfg.out)
    if len(done) != len(parts):
        raise UserError(f"{cfg.out}: {len(parts) - len(done)} part files missing after scoring; rerun to resume")
    totals = _totals(done, cfg)
    # Padding is only known for the parts scored now; a fully resumed run reports what it saw.
    seen = stats["real_tokens"] + stats["padded_tokens"]
    padding = stats["padded_tokens"] / seen if seen else 0.0
    if state.num_processes > 1:
        padding = _across_processes(padding, state) / state.num_processes
        scored = int(_across_processes(scored, state))
    if is_main:
        manifest = {
            "fingerprint": fingerprint,
            "fingerprint_digest": digest,
            "pairs": totals["pairs"],
            "tokens": totals["tokens"],
            "parts": [part_name(i) for i in sorted(done)],
            # Checked on every read: an altered or cut part is named instead of trained on.
            "part_sha256": {part_name(i): file_sha256(done[i]) for i in sorted(done)},
            "truncated": totals["truncated"],
            "padding_fraction": padding,
            "identical_after_truncation": totals["identical_after_truncation"],
            "schema": [f.name for f in SCORES_SCHEMA],
            "config": config_to_dict(cfg),
            "processes": state.num_processes,
        }
        write_json_atomic(cfg.out / SCORES_MANIFEST, manifest, record=True)
        (cfg.out / IN_PROGRESS).unlink(missing_ok=True)
    state.wait_for_everyone()
    return ScoreRefResult(totals["pairs"], totals["tokens"], time.perf_counter() - start, padding,
                          str(cfg.out), digest, scored_now=scored, reused=scored < totals["pairs"],
                          reused_pairs=totals["pairs"] - scored, identical_after_truncation=totals["identical_after_truncation"],
                          truncated=totals["truncated"])


_LENGTHS = ["prompt_len", "chosen_len", "rejected_len"]


def _tokens(rows: list[dict], cfg: ScoreRefConfig) -> int:
    """Tokens the forward passes read for these rows: the prompt and each response, under every mask."""
    return sum(cfg.samples * cfg.draws * (2 * r["prompt_len"] + r["chosen_len"] + r["rejected_len"]) for r in rows)


def _totals(done: dict[int, Path], cfg: ScoreRefConfig) -> dict[str, int]:
    totals = dict.fromkeys(("pairs", "tokens", "identical_after_truncation", "truncated"), 0)
    for i in sorted(done):  # one part in memory at a time
        rows = read_part(done[i], columns=[*_LENGTHS, "chosen_ids", "rejected_ids", "truncated"]).to_pylist()
        totals["pairs"] += len(rows)
        totals["tokens"] += _tokens(rows, cfg)
        totals["identical_after_truncation"] += sum(r["chosen_ids"] == r["rejected_ids"] for r in rows)
        totals["truncated"] += sum(bool(r["truncated"]) for r in rows)
    return totals


def _across_processes(value: float, state) -> float:
    """Sum of ``value`` over processes (gloo or nccl)."""
    from accelerate.utils import reduce

    return float(reduce(torch.tensor([float(value)], dtype=torch.float64, device=state.device), "sum").item())


def _score_ref_action(cfg: ScoreRefConfig, as_json: bool) -> None:
    result = run(cfg)
    if process_state(cfg.device).is_main_process:
        print_summary("score-ref", summary_dict(result), as_json)


command = stage_command(ScoreRefConfig, _score_ref_action, positional={"pairs": True},
                        doc="Score the pairs with the frozen reference model and cache the ELBO terms with their seeds.")
