"""SFT's configuration (TRL's SFTConfig words where they exist): the shared training fields
(pipeline/trainer/args.py, whose defaults are sft's) and SFT's own, every field documented, every range declared
once in ``RANGES`` and checked from there (``pipeline.core.config.check_ranges``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from pipeline.core.config import require
from pipeline.trainer import args
from pipeline.trainer.args import TrainingArgs

RANGES = {**args.RANGES, "max_length": "[2, inf)", "mask_eps": "[0, 1)", "pad_response_to": "[0, inf)"}
"""The valid interval of every numeric field (checked first in __post_init__)."""

RESUME_FREE = (*args.RESUME_FREE, "data")
"""Settings a resume may change (speed, memory, logging, where things are; the data goes by its sha256 in the
checkpoint's layout): every other one must equal the checkpoint's recorded config.yaml."""


@dataclass
class SFTConfig(TrainingArgs):
    data: Path = Path("data/sft.jsonl")
    """Training data: JSONL/JSON/Parquet/datasets folder in TRL's prompt-completion (prompt, completion),
    conversational (messages, or prompt and completion as message lists) or text format, or a pairs .arrow
    file from lldm-dpo ingest (its chosen side)."""
    chat_template: Optional[bool] = None
    """Render prompts with the tokenizer's chat template (default: when it has one), as score-ref, eval and
    generate do."""
    max_length: int = 1024
    """Longest prompt + response in tokens; longer examples lose prompt tokens from the left (score-ref's rule)."""
    pad_response_to: int = 0
    """Pad every response with EOS to this many tokens, the padding counted as response (LLaDA's released SFT:
    the model learns to fill a fixed-length generation's tail with EOS); 0 = no padding."""
    mask_eps: float = 1e-3
    """The timestep floor eps: t ~ U(eps, 1] per sequence (LLaDA's 1e-3)."""

    def __post_init__(self):
        self.data = Path(self.data)
        super().__post_init__(RANGES)
        require(self.pad_response_to <= self.max_length,
                f"pad_response_to ({self.pad_response_to}) exceeds max_length ({self.max_length})")


@dataclass
class SFTResult:
    steps: int
    epochs_seen: float
    examples: int
    truncated: int
    final_loss: float
    """The mean loss of the last logged step."""
    num_tokens: int
    """Tokens (prompt + response) the run trained on."""
    seconds: float
    out: str
    final_model: str
    metrics: str
    resumed_from: Optional[int] = None
    phase_seconds: dict[str, float] = field(default_factory=dict)
    """Where ``seconds`` went: setup (data, model, optimizer), train (the steps, with eval and checkpoints), save."""
