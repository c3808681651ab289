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

SCORES_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("split", pa.string()),
        ("prompt_ids", pa.list_(pa.int32())),  # as scored (after truncation)
        ("chosen_ids", pa.list_(pa.int32())),  # response ids, final EOS included
        ("rejected_ids", pa.list_(pa.int32())),
        ("prompt_len", pa.int32()),
        ("chosen_len", pa.int32()),
        ("rejected_len", pa.int32()),
        ("truncated", pa.bool_()),
        ("chosen_seeds", pa.list_(pa.int64())),  # mask seed per draw
        ("rejected_seeds", pa.list_(pa.int64())),
        ("chosen_mask_counts", _I32_MATRIX),  # masked tokens per sample, [draw][sample]
        ("rejected_mask_counts", _I32_MATRIX),
        ("chosen_timesteps", _F32_MATRIX),  # t per sample (l/L for the l_over_L scheme)
        ("rejected_timesteps", _F32_MATRIX),
        ("ref_chosen_terms", _F64_MATRIX),  # reference term per sample, [draw][sample]
        ("ref_rejected_terms", _F64_MATRIX),
        ("ref_chosen_elbo", pa.float64()),  # mean over all samples and draws
        ("ref_rejected_elbo", pa.float64()),
        ("ref_margin", pa.float64()),  # ref_chosen_elbo - ref_rejected_elbo
    ]
)

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
