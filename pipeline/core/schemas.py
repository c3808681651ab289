"""Named schemas of every file the pipeline writes: the data contracts.

Downstream stages and ``lldm-dpo query`` rely on these names; change them only
together with DESIGN's contract.
"""

from __future__ import annotations

import pyarrow as pa

SIDES = ("chosen", "rejected")
"""The two responses of a pair, in the order every file, cache row and request list keeps them."""

# --- pairs (ingest output, Arrow IPC file) ---------------------------------

MESSAGES_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))

PAIRS_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),  # hex digest of the normalized prompt/chosen/rejected
        ("prompt", pa.string()),  # text; for conversations, a readable rendering
        ("chosen", pa.string()),
        ("rejected", pa.string()),
        # Structured conversations (null for the standard text format), kept so
        # score-ref can apply the model's own chat template.
        ("prompt_messages", MESSAGES_TYPE),
        ("chosen_messages", MESSAGES_TYPE),
        ("rejected_messages", MESSAGES_TYPE),
        ("split", pa.string()),  # "train" or "eval"
        ("source", pa.string()),  # "file:line" or "file:row"
    ]
)
"""Ingest's output. Kept extra fields (``--keep-field``) follow as string columns (JSON-encoded values)."""

SPLITS = ("train", "eval")

# --- quarantine (ingest output, JSONL) -------------------------------------

QUARANTINE_FIELDS = ("source", "line", "reason", "message", "raw")
"""Keys of each quarantine JSONL record: file, 1-based line or 0-based row, reason code, one-line message, raw record text."""

REASON_CODES = (
    "invalid_json",
    "invalid_utf8",
    "missing_field",
    "wrong_type",
    "empty_text",
    "identical_responses",
    "duplicate_pair",
    "malformed_messages",
    "too_long",
)

# --- reference scores (score-ref output, Parquet parts + manifest.json) ----

_F64_MATRIX = pa.list_(pa.list_(pa.float64()))  # [draw][sample]
_I32_MATRIX = pa.list_(pa.list_(pa.int32()))
_F32_MATRIX = pa.list_(pa.list_(pa.float32()))

# The cache's column names, one constant each; a side's (or the prompt's) columns by side name.
PAIR_ID_COLUMN = "pair_id"
SPLIT_COLUMN = "split"
TRUNCATED_COLUMN = "truncated"
IDS_COLUMNS = {part: f"{part}_ids" for part in ("prompt", *SIDES)}
"""Token ids as scored (after truncation); a response's final EOS included."""
LEN_COLUMNS = {part: f"{part}_len" for part in ("prompt", *SIDES)}
SEED_COLUMNS = {side: f"{side}_seeds" for side in SIDES}
"""Mask seed per draw."""
MASK_COUNT_COLUMNS = {side: f"{side}_mask_counts" for side in SIDES}
"""Masked tokens per sample, [draw][sample]."""
TIMESTEP_COLUMNS = {side: f"{side}_timesteps" for side in SIDES}
"""t per sample, [draw][sample] (l/L for the l_over_L scheme)."""
REF_TERM_COLUMNS = {side: f"ref_{side}_terms" for side in SIDES}
"""The reference's term per sample, [draw][sample]."""
REF_ELBO_COLUMNS = {side: f"ref_{side}_elbo" for side in SIDES}
"""The reference's ELBO: the mean over all samples and draws."""
REF_MARGIN_COLUMN = "ref_margin"
"""ref_chosen_elbo - ref_rejected_elbo."""
LENGTH_COLUMNS = tuple(LEN_COLUMNS.values())
"""prompt_len, chosen_len, rejected_len."""

SCORES_SCHEMA = pa.schema(
    [
        (PAIR_ID_COLUMN, pa.string()),
        (SPLIT_COLUMN, pa.string()),
        *((IDS_COLUMNS[part], pa.list_(pa.int32())) for part in ("prompt", *SIDES)),
        *((LEN_COLUMNS[part], pa.int32()) for part in ("prompt", *SIDES)),
        (TRUNCATED_COLUMN, pa.bool_()),
        *((SEED_COLUMNS[side], pa.list_(pa.int64())) for side in SIDES),
        *((MASK_COUNT_COLUMNS[side], _I32_MATRIX) for side in SIDES),
        *((TIMESTEP_COLUMNS[side], _F32_MATRIX) for side in SIDES),
        *((REF_TERM_COLUMNS[side], _F64_MATRIX) for side in SIDES),
        *((REF_ELBO_COLUMNS[side], pa.float64()) for side in SIDES),
        (REF_MARGIN_COLUMN, pa.float64()),
    ]
)
"""One row per pair of score-ref's Parquet parts (column order as above: the cache's bytes depend on it)."""

DEFAULT_SPLIT = SPLITS[0]
"""The split of a pair whose split is unset (files written before splits existed)."""


def split_of(value: str | None) -> str:
    """A pair's or cache row's split, an unset one read as ``DEFAULT_SPLIT``."""
    return value or DEFAULT_SPLIT


SCORES_MANIFEST = "manifest.json"

# --- training metrics (RUN_DIR/metrics.parquet) ----------------------------

METRIC_COLUMNS = (
    "step",
    "epoch",
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "learning_rate",
    "grad_norm",
    "tokens_per_second",
    "peak_memory_bytes",
    "ref/gap_max",
    "masks/reused",
    "num_tokens",
    "preference_loss",  # the loss's terms: preference_loss + sft weight x nll_loss = loss
    "nll_loss",
    # The estimated variance of the preference score at the cache's budget (pipeline/estimator/score_variance.py).
    "score_variance",
    # Held-out metrics (train --eval-every): NaN on steps without an evaluation.
    "eval/loss",
    "eval/rewards/chosen",
    "eval/rewards/rejected",
    "eval/rewards/accuracies",
    "eval/rewards/margins",
    "eval/logps/chosen",
    "eval/logps/rejected",
    "eval/preference_loss",
    "eval/nll_loss",
)
EVAL_METRIC_COLUMNS = tuple(c for c in METRIC_COLUMNS if c.startswith("eval/"))
"""The held-out metrics of train --eval-every (NaN on steps without an evaluation)."""
LATER_METRIC_COLUMNS = ("ref/gap_max", "masks/reused", "num_tokens", "preference_loss", "nll_loss",
                        "score_variance") + EVAL_METRIC_COLUMNS
"""Columns added after the first metrics files were written: absent ones read as NaN."""


# --- iterative rounds (OUT/rounds.parquet of `run --rounds`) ----------------

ROUNDS_SCHEMA = pa.schema(
    [
        ("round", pa.int64()),  # 0: the original model (task figures only)
        ("model", pa.string()),  # the model whose task accuracy the row gives
        ("pairs", pa.int64()),
        ("pairs_reference_chosen", pa.int64()),
        ("pass_at_k", pa.float64()),  # the round's starting policy on the training questions
        ("sample_accuracy", pa.float64()),
        ("train_loss", pa.float64()),  # the round's last logged DPO loss
        ("preference_accuracy", pa.float64()),  # held-out pairs
        ("task_accuracy", pa.float64()),
        ("task_correct", pa.float64()),  # credited items (half credits possible)
        ("task_n", pa.int64()),
        ("task_low", pa.float64()),  # 95% Wilson interval
        ("task_high", pa.float64()),
        ("difference", pa.float64()),  # task accuracy minus the original model's, same items
        ("difference_low", pa.float64()),
        ("difference_high", pa.float64()),
        ("method", pa.string()),  # the difference's interval (Newcombe's paired method)
    ]
)
"""One row per round of ``run --rounds`` (round 0 the original model), the figures of OUT/rounds.json."""
