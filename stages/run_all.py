"""``lldm-dpo run``: ingest, score-ref, train, eval and report in order, on the embedded default.

The embedded default (``stages/run.yaml``) is one round (``stages.run_rounds``)
on the ``skill`` preset, a small LLaDA trained on the project's own short
arithmetic word problems: make-pairs from its own graded samples on the
shipped train questions, score-ref, DPO with the NLL term on the chosen
response, and greedy task accuracy on 1,000 held-out questions before and
after with the paired interval of the difference. ``rounds: 0`` (and no
``questions``) is the single pass on the ingest inputs. A ``--config`` file overrides it section by
section (``ingest``, ``score_ref``, ``train``, ``eval``): every stage's keys
are accepted there, with the same validation as the stage's own command.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

from pipeline.cli.commands import emit_json, stage_command, summary_dict
from pipeline.cli.loading import check_section_keys, load_config, merge_sections
from pipeline.cli.trl_names import overlay, seed_project_config
from pipeline.core.atomic import check_writable
from pipeline.core.config import check_device, check_ranges, read_config_file, require
from pipeline.core.errors import ConfigError
from pipeline.core.paths import PAIRS_FILE
from pipeline.core.progress import stage_timer
from pipeline.report.summary import print_rounds_summary, print_run_summary, run_result
from stages.run_stages import load_stages, score_train_eval, shipped_path, stage_classes

EMBEDDED_DEFAULT = Path(__file__).with_name("run.yaml")
SECTIONS = ("ingest", "score_ref", "train", "eval", "make_pairs")
ROUND_REFERENCES = ("policy", "initial")


RANGES = {"rounds": "[0, inf)", "threshold": "(0, inf)"}
"""The valid interval of every numeric field (checked first in __post_init__)."""


@dataclass
class RunConfig:
    out: Path = Path("runs/default")
    """Folder for every artefact: pairs, reference cache, run (checkpoints, model, metrics, eval, report)."""
    model: str = "tiny"
    """Reference model and policy init (a preset name or a local checkpoint folder)."""
    ingest: dict = field(default_factory=dict)
    """Keys of the ingest stage's config (inputs, eval_fraction, ...)."""
    score_ref: dict = field(default_factory=dict)
    """Keys of the score-ref stage's config (samples, draws, limit, ...)."""
    train: dict = field(default_factory=dict)
    """Keys of the train stage's config (max_steps, learning_rate, lora_r, ...)."""
    eval: dict = field(default_factory=dict)
    """Keys of the eval stage's config (benchmark, limit_task, gen_length, ...)."""
    report: bool = True
    """Write report.png and report.html into the run folder."""
    device: str = "auto"
    """Device for every stage."""
    progress: bool = True
    """Each stage's progress with its ETA, the stage the run is in and the run's time so far (a bar on a terminal,
    a line every 30 s otherwise: LLDM_DPO_PROGRESS_SECONDS); a section's own `progress` wins."""
    rounds: int = 0
    """Iterative rounds on --questions (make-pairs with the last policy, score-ref, train, eval); 0: one pass on the ingest inputs."""
    questions: Optional[str] = None
    """Questions JSONL ({question, answer}) the policy samples and is graded on each round (needs rounds > 0)."""
    round_reference: str = "policy"
    """Reference model of each round: policy (the round's starting policy) or initial (the original model)."""
    fresh_questions: bool = False
    """Each round samples the next ``make_pairs.limit`` questions of --questions (round r: ``make_pairs.offset`` +
    (r - 1) x limit onwards) instead of the same ones; the file must hold them all (checked before any work)."""
    make_pairs: dict = field(default_factory=dict)
    """Keys of the make-pairs stage's config for the rounds (num_generations, temperature, pairs_per_question, ...)."""
    kv_cache: Optional[str] = None
    """Sampler KV cache (none, prefix, dual) for eval and make-pairs: sets their sections' `kv_cache` when given
    (formerly `cache`, still accepted)."""
    threshold: Optional[float] = None
    """Parallel-decoding threshold for eval and make-pairs: sets their sections' `threshold` when given."""

    def __post_init__(self):
        self.out = Path(self.out)
        check_ranges(self, RANGES)
        check_device(self.device)
        for name in SECTIONS:
            require(isinstance(getattr(self, name), dict), f"section '{name}' must be a mapping of that stage's keys")
        if self.kv_cache is not None or self.threshold is not None:
            from pipeline.sampling.args import check_fast_settings

            try:
                check_fast_settings(self.kv_cache or "none", self.threshold, "low_confidence")
            except (TypeError, ValueError) as exc:
                raise ConfigError(str(exc)) from None
        for name in ("kv_cache", "threshold"):  # the sampler settings run-wide: every stage that samples
            if getattr(self, name) is not None:
                self.eval = overlay(self.eval, {name: getattr(self, name)})
                self.make_pairs = overlay(self.make_pairs, {name: getattr(self, name)})
        require(self.round_reference in ROUND_REFERENCES,
                f"round_reference must be one of {', '.join(ROUND_REFERENCES)}, got {self.round_reference!r}")
        require(not self.rounds or self.questions, "run --rounds needs --questions FILE (JSONL of question and answer)")
        require(self.rounds or not self.questions, "--questions is used by iterative rounds: add --rounds R")
        require(not self.fresh_questions or self.rounds, "fresh_questions is for iterative rounds: add --rounds R")
        limit = self.make_pairs.get("limit", 0)
        require(not self.fresh_questions or (type(limit) is int and limit > 0),
                "fresh_questions needs make_pairs.limit > 0: the number of questions each round samples")
        # LoRA rounds: the next round would start from an adapter folder and stack a second adapter on it.
        require(not self.rounds or int(self.train.get("lora_r", 0) or 0) <= 0,
                "run --rounds trains full models; LoRA rounds (lora_r > 0) are not supported yet")
        require(not self.rounds or self.eval.get("benchmark"),
                "run --rounds measures task accuracy: the eval section needs a benchmark")


def merged_config(config_file: Path | None, flags: dict[str, Any]) -> RunConfig:
    """Embedded default < user's file (section by section) < flags."""
    base = read_config_file(EMBEDDED_DEFAULT)
    # the user's file, with the seed project's keys too
    user = {} if config_file is None else seed_project_config(read_config_file(config_file), str(config_file))
    flags = dict(flags)
    sections = {key: flags.pop(key) for key in SECTIONS if isinstance(flags.get(key), dict)}
    base = merge_sections(base, SECTIONS, user, sections)  # a section (file's, then flag's) adds to the one before
    rounds = flags["rounds"] if flags.get("rounds") is not None else base.get("rounds", 0)
    if not rounds and flags.get("questions") is None and "questions" not in user:
        # The embedded default's questions belong to its rounds: `run --rounds 0` is the single pass.
        base.pop("questions", None)
    origin = str(EMBEDDED_DEFAULT if config_file is None else config_file)
    cfg = load_config(RunConfig, None, flags, values=base, origin=origin)
    # every section's keys checked here, so --print-config refuses what `run` refuses
    if not cfg.rounds:
        stage_configs(cfg)
    else:  # unknown keys in a rounds' section are an error now, not when a round reaches that stage
        check_section_keys(stage_classes(), {name: getattr(cfg, name) for name in SECTIONS}, "run config")
    return cfg


def stage_configs(cfg: RunConfig):
    out = cfg.out
    shown = {"progress": cfg.progress}
    ingest = {**shown, **cfg.ingest, "out": str(out / PAIRS_FILE)}
    ingest["inputs"] = [shipped_path(p) for p in ingest.get("inputs", [])]
    score = {"model": cfg.model, "device": cfg.device, **shown, **cfg.score_ref, "pairs": out / PAIRS_FILE,
             "out": out / "cache"}
    train = {"device": cfg.device, **shown, **cfg.train, "scores": out / "cache", "out": out / "run",
             "model": cfg.model}
    ev = {"device": cfg.device, **shown, **cfg.eval, "scores": out / "cache", "out": out / "run",
          "model": str(out / "run" / "final"), "before": cfg.model}
    return load_stages("run config", ingest=ingest, score_ref=score, train=train, eval=ev)


def run(cfg: RunConfig, log=print):
    """The single pass (RunResult), or with ``cfg.rounds`` the iterative rounds (RoundsResult)."""
    if cfg.rounds:
        from stages.run_rounds import run_rounds

        return run_rounds(cfg, log)
    from pipeline.trainer.session import check_run_outputs
    from stages import ingest

    start = time.perf_counter()
    ingest_cfg, score_cfg, train_cfg, eval_cfg = stage_configs(cfg)  # every section validated before work
    times: dict[str, float] = {}
    timed = stage_timer(log, times, since=start)
    check_writable(cfg.out, "output folder")
    if not train_cfg.resume:
        # `run` retrains from scratch (the reference cache is reused when unchanged): train removes
        # what earlier runs wrote in DIR/run, never a file of the user's, so it is checked before any work.
        train_cfg = replace(train_cfg, overwrite=True)
        check_run_outputs(train_cfg.out)
    ing = timed("ingest", ingest.run, ingest_cfg)
    sc, tr, ev, paths = score_train_eval(cfg, timed, score_cfg, train_cfg, eval_cfg)
    return run_result(cfg.out, time.perf_counter() - start, times, (ing, sc, tr, ev), paths)


def _run_action(cfg: RunConfig, as_json: bool) -> None:
    result = run(cfg, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    if as_json:
        emit_json(summary_dict(result))
    elif cfg.rounds:
        print_rounds_summary(result)
    else:
        print_run_summary(result)


command = stage_command(RunConfig, _run_action, load=merged_config,
                        doc="Run every stage in order on the embedded default (or your config): ingest, score-ref, "
                            "train, eval, report.")
