"""``lldm-dpo generate``: LLaDA's diffusion sampler over a file of prompts.

Input: JSONL with a ``prompt`` (text or a message list) or ``question``
field per line, or a pairs Arrow file from ``ingest``. Output: JSONL, one row
per prompt in input order: ``index`` (0-based input row), ``prompt``,
``completion`` (decoded, cut at EOS / ``<|eot_id|>``), ``completion_tokens``,
``stopped`` (a stop token was generated), the input's other fields, and
``sampler`` (the settings that produced it).

Results stream to ``OUT.partial`` after every batch; the finished file is
renamed into place sorted by index. A rerun skips prompts already in the
output or the partial file (same prompt at the same index, same sampler
settings); different settings are an error naming the setting. Each prompt
gets its own noise generator seeded by (seed, index), and batches are left
padded, so a prompt's completion does not depend on the batch size or its
neighbours, and a resumed run gives what an uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from pipeline.cli.commands import emit_json, print_summary, stage_command
from pipeline.core.config import config_to_dict
from pipeline.core.lock import output_lock
from pipeline.sampling.args import SAMPLING_RANGES, SamplingArgs
from pipeline.sampling.completion import check_loading

if TYPE_CHECKING:  # the run's module (pyarrow, numpy) loads when the command runs, not when it is parsed
    from pipeline.sampling.generate_run import GenerateResult

RANGES = {**SAMPLING_RANGES, "limit": "[0, inf)"}
"""The valid interval of every numeric field (checked first in __post_init__)."""


@dataclass
class GenerateConfig(SamplingArgs):
    """The sampler's settings (``SamplingArgs``: gen_length, block_length, steps, temperature, remasking,
    cfg_scale, kv_cache, threshold, batch_size, seed) and generate's own."""

    model: str = "tiny"
    """Model: preset name (tiny, micro) or a local model folder."""
    prompts: str = ""
    """Prompts file: JSONL with a `prompt` or `question` field, or a pairs Arrow file."""
    out: str = "data/out/generations.jsonl"
    """Output JSONL (written atomically; a partial run resumes from OUT.partial)."""
    prompt_field: Optional[str] = None
    """Input field holding the prompt; default: `prompt`, else `question`."""
    chat_template: Optional[bool] = None
    """Wrap each text prompt as a user turn in the tokenizer's chat template; false: raw text. Default: the
    rendering of `scores` when given, else on when the tokenizer has a template (pipeline/data/prompts.py)."""
    scores: Optional[str] = None
    """A reference-score cache whose prompt rendering to follow (generating for a run trained on it)."""
    limit: int = 0
    """Generate for the first N prompts only (0: all)."""
    dtype: str = "float32"
    """float32, bfloat16 or float16 (bfloat16 under load_in_4bit)."""
    load_in_4bit: bool = False
    """Quantize the model's block projections to 4-bit NF4 with bitsandbytes (CPU or CUDA), as a QLoRA base."""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto (accelerate's device for this process)."""
    trust_remote_code: bool = False
    """Allow a hub model's own modeling code."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        super().__post_init__(RANGES)
        check_loading(self)


def run(cfg: GenerateConfig) -> GenerateResult:
    """The stage, holding its output's lock (a second run into the same file refuses, naming the first)."""
    from pipeline.sampling.generate_run import generate_completions

    with output_lock(cfg.out, "generate", folder=False):
        return generate_completions(cfg)


def _generate_action(cfg: GenerateConfig, as_json: bool) -> None:
    result = run(cfg)
    summary = {k: v for k, v in result.__dict__.items() if k != "details"}
    if as_json:
        emit_json({**summary, "config": config_to_dict(cfg)})
    else:
        print_summary("generate", summary, as_json=False)


command = stage_command(GenerateConfig, _generate_action,
                        doc="Sample completions with LLaDA's diffusion sampler (low-confidence remasking, blocks).")
