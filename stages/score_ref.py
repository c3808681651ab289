"""``lldm-dpo score-ref``: run the frozen reference model once, cache its ELBO terms with their mask seeds.

The work is pipeline.refcache.scoring's (parts scored in a fixed order, written atomically, a killed run resumed
at its first missing part); this module is the command: its config, the memory plan it checks, the command line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from pipeline.cli.commands import print_summary, stage_command, summary_dict
from pipeline.core.config import check_device, check_ranges, require_choice
from pipeline.core.devices import DTYPE_NAMES, PRECISION_NAMES, process_state
from pipeline.core.errors import ConfigError
from pipeline.core.lock import output_lock
from pipeline.estimator.diffusion import BATCH_TOKENS, PAIR_MASKS, SCHEMES

if TYPE_CHECKING:
    from pipeline.refcache.scoring import ScoreRefResult

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
    """Global mask seed; masks depend only on (seed, pair_id, side, draw), the side left out under pair_masks
    shared."""
    pair_masks: str = "independent"
    """independent: the chosen and rejected responses draw their masks from seeds of their own; shared: one seed
    per pair and draw for both, so they have the same timesteps and, at equal lengths (``pad_to``), the same
    masked positions. Shared masks make the tokens the two responses share nearly cancel in the DPO margin and
    its gradient (each side's estimate is as before; docs/estimator.md). In the fingerprint."""
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
    batch_tokens: int = BATCH_TOKENS
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
        require_choice("pair_masks", self.pair_masks, PAIR_MASKS)
        require_choice("dtype", self.dtype, DTYPE_NAMES)
        require_choice("mixed_precision", self.mixed_precision, PRECISION_NAMES)
        if self.load_in_4bit and self.dtype == "float32":
            self.dtype = "bfloat16"  # the 4-bit base computes in bfloat16, as in train
        if self.pad_to > self.max_length:
            raise ConfigError(f"pad_to ({self.pad_to}) exceeds max_length ({self.max_length})")
        if self.load_in_4bit and self.dtype != "bfloat16":
            raise ConfigError(f"load_in_4bit computes in bfloat16, got dtype '{self.dtype}'")


def _check_memory(cfg: ScoreRefConfig, device) -> None:
    """lldm-dpo plan's check, every pair planned at --max-length (the longest parts are scored first); the
    planner imports the trainer and peft: seconds a CPU run, which never checks, skips."""
    from pipeline.plan import Shape, check_start

    check_start("score-ref", cfg, Shape(cfg.samples, cfg.max_length, cfg.max_length // 4), device)


def run(cfg: ScoreRefConfig) -> "ScoreRefResult":
    """The stage, holding its output's lock (a second run into the same place refuses, naming the first); returns
    pipeline.refcache.scoring.ScoreRefResult. The scoring (and torch) loads here: --help and a refused flag need
    only the config."""
    from pipeline.refcache.scoring import score_to_cache

    with output_lock(cfg.out, "score-ref", folder=True):
        return score_to_cache(cfg, check_memory=_check_memory)


def _score_ref_action(cfg: ScoreRefConfig, as_json: bool) -> None:
    result = run(cfg)
    if process_state(cfg.device).is_main_process:
        print_summary("score-ref", summary_dict(result), as_json)


command = stage_command(ScoreRefConfig, _score_ref_action, positional={"pairs": True},
                        doc="Score the pairs with the frozen reference model and cache the ELBO terms with their seeds.")
