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

from rich.console import Console
from rich.table import Column, Table

from pipeline.atomic import check_writable
from pipeline.config import check_device, check_keys, check_ranges, load_config, read_config_file, require
from pipeline.errors import CacheMismatch, ConfigError, UserError
from pipeline.layout import PAIRS_FILE
from pipeline.stagecli import emit_json, stage_command, summary_dict
from pipeline.trl_names import seed_project_config, translate

EMBEDDED_DEFAULT = Path(__file__).with_name("run.yaml")
REPO_ROOT = Path(__file__).resolve().parents[1]
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
    make_pairs: dict = field(default_factory=dict)
    """Keys of the make-pairs stage's config for the rounds (num_generations, temperature, pairs_per_question, ...)."""
    cache: Optional[str] = None
    """Sampler KV cache (none, prefix, dual) for eval and make-pairs: sets their sections' `cache` when given."""
    threshold: Optional[float] = None
    """Parallel-decoding threshold for eval and make-pairs: sets their sections' `threshold` when given."""

    def __post_init__(self):
        self.out = Path(self.out)
        check_ranges(self, RANGES)
        check_device(self.device)
        for name in SECTIONS:
            require(isinstance(getattr(self, name), dict), f"section '{name}' must be a mapping of that stage's keys")
        if self.cache is not None or self.threshold is not None:
            from pipeline.sampler import check_fast_settings

            try:
                check_fast_settings(self.cache or "none", self.threshold, "low_confidence")
            except (TypeError, ValueError) as exc:
                raise ConfigError(str(exc)) from None
        for name in ("cache", "threshold"):  # the sampler settings run-wide: every stage that samples
            if getattr(self, name) is not None:
                self.eval = {**self.eval, name: getattr(self, name)}
                self.make_pairs = {**self.make_pairs, name: getattr(self, name)}
        require(self.round_reference in ROUND_REFERENCES,
                f"round_reference must be one of {', '.join(ROUND_REFERENCES)}, got {self.round_reference!r}")
        require(not self.rounds or self.questions, "run --rounds needs --questions FILE (JSONL of question and answer)")
        require(self.rounds or not self.questions, "--questions is used by iterative rounds: add --rounds R")
        # LoRA rounds: the next round would start from an adapter folder and stack a second adapter on it.
        require(not self.rounds or int(self.train.get("lora_r", 0) or 0) <= 0,
                "run --rounds trains full models; LoRA rounds (lora_r > 0) are not supported yet")
        require(not self.rounds or self.eval.get("benchmark"),
                "run --rounds measures task accuracy: the eval section needs a benchmark")


@dataclass
class RunResult:
    out: str
    seconds: float
    stage_seconds: dict[str, float]
    pairs: dict[str, int]
    preference_accuracy: dict[str, float]
    elbo_accuracy: dict[str, float]
    task_accuracy: dict[str, float]
    choice_accuracy: dict[str, float]
    final_train_loss: float
    final_train_reward_accuracy: float
    artefacts: dict[str, str]
    example_query: str
    intervals: dict[str, dict[str, Any]] = field(default_factory=dict)
    """eval's intervals block: per figure the count and 95% Wilson interval of before and after, and the paired
    interval of after - before (stages.evaluate.EvalResult.intervals)."""
    mc_spread: dict[str, dict[str, Any]] = field(default_factory=dict)
    """eval's figures under several mask seeds (eval: mc_seeds > 1)."""


def merged_config(config_file: Path | None, flags: dict[str, Any]) -> RunConfig:
    """Embedded default < user's file (section by section) < flags."""
    base = read_config_file(EMBEDDED_DEFAULT)
    # the user's file, with the seed project's keys too
    user = {} if config_file is None else seed_project_config(read_config_file(config_file), str(config_file))
    flags = dict(flags)
    sections = {key: flags.pop(key) for key in SECTIONS if isinstance(flags.get(key), dict)}
    for key, value in [*user.items(), *sections.items()]:  # a section (file's, then flag's) adds to the one before
        if key in SECTIONS and isinstance(value, dict):
            base[key] = {**base.get(key, {}), **value}
        else:
            base[key] = value
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
        for name, cls in stage_classes().items():
            where = f"run config: {name}"
            check_keys(cls, translate(cls, dict(getattr(cfg, name)), where), where)
    return cfg


def stage_classes() -> dict[str, type]:
    """Each section's stage config class (imported here: the stages load torch, which `run --help` need not)."""
    from stages.evaluate import EvalConfig
    from stages.ingest import IngestConfig
    from stages.make_pairs import MakePairsConfig
    from stages.score_ref import ScoreRefConfig
    from stages.train import TrainConfig

    return {"ingest": IngestConfig, "score_ref": ScoreRefConfig, "train": TrainConfig, "eval": EvalConfig,
            "make_pairs": MakePairsConfig}


def _shipped(path: str) -> str:
    """Paths of the shipped data resolve against the repository when absent from the working directory."""
    p = Path(path)
    if not p.is_absolute() and not p.exists() and (REPO_ROOT / p).exists():
        return str(REPO_ROOT / p)
    return path


def load_stages(where: str, **sections: dict) -> tuple:
    """The named stages' configs, validated in the order given (eval's shipped benchmark and choices found)."""
    for key in ("benchmark", "choices"):
        if sections.get("eval", {}).get(key):
            sections["eval"][key] = _shipped(sections["eval"][key])
    classes = stage_classes()
    return tuple(load_config(classes[name], values=values, origin=f"{where}: {name}")
                 for name, values in sections.items())


def stage_configs(cfg: RunConfig):
    out = cfg.out
    shown = {"progress": cfg.progress}
    ingest = {**shown, **cfg.ingest, "out": str(out / PAIRS_FILE)}
    ingest["inputs"] = [_shipped(p) for p in ingest.get("inputs", [])]
    score = {"model": cfg.model, "device": cfg.device, **shown, **cfg.score_ref, "pairs": out / PAIRS_FILE,
             "out": out / "cache"}
    train = {"device": cfg.device, **shown, **cfg.train, "scores": out / "cache", "out": out / "run",
             "model": cfg.model}
    ev = {"device": cfg.device, **shown, **cfg.eval, "scores": out / "cache", "out": out / "run",
          "model": str(out / "run" / "final"), "before": cfg.model}
    return load_stages("run config", ingest=ingest, score_ref=score, train=train, eval=ev)


def planned_epochs(score_cfg, train_cfg) -> int:
    """Epochs the train stage will start on the pairs score-ref is about to score (one process)."""
    from pipeline.pairsfile import read_pairs
    from stages.train import epochs_needed

    table = read_pairs(score_cfg.pairs)
    if score_cfg.limit:
        table = table.slice(0, score_cfg.limit)
    splits = table.column("split").to_pylist() if "split" in table.column_names else ["train"] * table.num_rows
    n_train = sum((s or "train") == "train" for s in splits)
    return epochs_needed(max(n_train, 1), train_cfg)


def stage_timer(log, times: dict[str, float], r: int | None = None, since: float | None = None):
    """``timed(name, fn, stage_cfg)``: runs one stage, logging it (within round ``r``) and its seconds in ``times``;
    the progress drawn meanwhile names the stage and the time since ``since`` (the run's start)."""
    from pipeline.progress import fmt_duration, stage

    since = time.perf_counter() if since is None else since

    def timed(name, fn, stage_cfg):
        t0 = time.perf_counter()
        label = name if r is None else f"round {r}: {name}"
        log(f"[{label}] ... (run {fmt_duration(t0 - since)} so far)")
        with stage(label, since):
            result = fn(stage_cfg)
        times[name] = round(time.perf_counter() - t0, 2)
        log(f"[{label}] done in {fmt_duration(times[name])} (run {fmt_duration(time.perf_counter() - since)})")
        return result

    return timed


def score_train_eval(cfg: RunConfig, timed, score_cfg, train_cfg, eval_cfg):
    """The stages after ingest, as `run` and each round chain them: score-ref (unless its section sets draws,
    one mask draw per epoch training will start: train refuses fewer), train, eval and the report. Their
    results, the report's paths last (None without ``cfg.report``)."""
    from pipeline.report import write_report
    from stages import evaluate, score_ref, train

    if "draws" not in cfg.score_ref:
        score_cfg = replace(score_cfg, draws=max(score_cfg.draws, planned_epochs(score_cfg, train_cfg)))
    try:
        sc = timed("score-ref", score_ref.run, score_cfg)
    except CacheMismatch as exc:  # score-ref's own advice (--overwrite) is not a `run` flag
        raise UserError(f"{exc.detail}; to rescore it pass --score-ref '{{overwrite: true}}' "
                        "(or score_ref: {overwrite: true} in --config), or choose another --out") from None
    tr = timed("train", train.run, train_cfg)
    ev = timed("eval", evaluate.run, eval_cfg)
    paths = timed("report", lambda _: write_report(train_cfg.out), None) if cfg.report else None
    return sc, tr, ev, paths


def run(cfg: RunConfig, log=print):
    """The single pass (RunResult), or with ``cfg.rounds`` the iterative rounds (stages.run_rounds.RoundsResult)."""
    if cfg.rounds:
        from stages.run_rounds import run_rounds

        return run_rounds(cfg, log)
    from stages import ingest, train

    start = time.perf_counter()
    ingest_cfg, score_cfg, train_cfg, eval_cfg = stage_configs(cfg)  # every section validated before work
    times: dict[str, float] = {}
    timed = stage_timer(log, times, since=start)
    check_writable(cfg.out, "output folder")
    if not train_cfg.resume:
        # `run` retrains from scratch (the reference cache is reused when unchanged): train removes
        # what earlier runs wrote in DIR/run, never a file of the user's, so it is checked before any work.
        train_cfg = replace(train_cfg, overwrite=True)
        train.check_run_outputs(train_cfg.out)
    ing = timed("ingest", ingest.run, ingest_cfg)
    sc, tr, ev, paths = score_train_eval(cfg, timed, score_cfg, train_cfg, eval_cfg)
    artefacts = {"pairs": ing.out, "quarantine": ing.quarantine, "reference_cache": sc.out, "run": tr.out,
                 "final_model": tr.final_model, "metrics": tr.metrics, "eval": ev.eval_json}
    if paths is not None:
        artefacts.update(report_html=str(paths.html), report_png=str(paths.png))
    query = (f"lldm-dpo query --pairs {ing.out} --scores {sc.out} --run {tr.out} "
             "\"SELECT pairs.split, count(*) AS pairs, avg(ref_margin) AS mean_ref_margin "
             "FROM pairs JOIN scores USING (pair_id) GROUP BY pairs.split ORDER BY 1\"")
    return RunResult(
        out=str(cfg.out), seconds=round(time.perf_counter() - start, 2), stage_seconds=times,
        pairs={"read": ing.read, "accepted": ing.accepted, "quarantined": ing.quarantined, "scored": sc.pairs},
        preference_accuracy=ev.preference_accuracy, elbo_accuracy=ev.elbo_accuracy, task_accuracy=ev.task_accuracy,
        choice_accuracy=ev.choice_accuracy,
        final_train_loss=tr.final_loss, final_train_reward_accuracy=tr.final_reward_accuracy,
        artefacts=artefacts, example_query=query, intervals=ev.intervals, mc_spread=ev.mc_spread,
    )


def fits_wide(headers: list[str], rows: list[list[str]], width: int) -> bool:
    """Whether a table of ``rows`` under ``headers`` shows every cell whole in ``width`` columns (headers may
    wrap at their spaces, a figure may not); else a summary is laid out vertically, one (metric, value) a line."""
    need = 1
    for i, header in enumerate(headers):
        cells = [len(r[i]) for r in rows] + [max((len(w) for w in header.split()), default=0)]
        need += max(cells) + 3  # a cell's padding and its border
    return need <= width


def figure_table(title: str, rows: list[tuple[str, str]]) -> Table:
    """A (metric, value) table: the metric folds onto more lines when the terminal is narrow, the value never."""
    table = Table(Column(title, overflow="fold", ratio=1), Column("", justify="right", no_wrap=True),
                  show_header=bool(title), title_justify="left")
    for name, value in rows:
        table.add_row(name, value)
    return table


def print_run_summary(result: RunResult, console: Console | None = None) -> None:
    from stages.evaluate import print_intervals

    console = console or Console()
    title = f"lldm-dpo run: done in {result.seconds:.0f}s"
    rows = []
    for key, name, values in (("preference_accuracy", "preference accuracy", result.preference_accuracy),
                              ("elbo_accuracy", "ELBO accuracy (B(chosen) > B(rejected))", result.elbo_accuracy),
                              ("task_accuracy", "task accuracy (generation)", result.task_accuracy),
                              ("choice_accuracy", "multiple-choice accuracy (option ELBO)", result.choice_accuracy)):
        if values and key not in result.intervals:  # those with counts and intervals are listed below
            rows.append([name, f"{values.get('before', float('nan')):.3f}", f"{values.get('after', float('nan')):.3f}"])
    headers = ["held-out evaluation", "before", "after"]
    if not rows:
        console.print(title)
    elif fits_wide(headers, rows, console.width):
        table = Table(headers[0], Column("before", justify="right"), Column("after", justify="right"),
                      title=title, title_justify="left")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    else:  # narrow: one (metric, value) a line
        console.print(title)
        console.print(figure_table("held-out evaluation", [(f"{name}, {side}", value) for name, *values in rows
                                                           for side, value in zip(("before", "after"), values)]))
    print_intervals(result.intervals, result.mc_spread, title="held-out evaluation, 95% intervals")
    console.print(f"train: final loss {result.final_train_loss:.4f}, "
                  f"reward accuracy {result.final_train_reward_accuracy:.3f}")
    for key, path in result.artefacts.items():
        console.print(f"  {key:16} {path}", soft_wrap=True, markup=False)
    console.print("try:", result.example_query, soft_wrap=True, markup=False)


def _run_action(cfg: RunConfig, as_json: bool) -> None:
    result = run(cfg, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    if as_json:
        emit_json(summary_dict(result))
    elif cfg.rounds:
        from stages.run_rounds import print_rounds_summary

        print_rounds_summary(result)
    else:
        print_run_summary(result)


command = stage_command(RunConfig, _run_action, load=merged_config,
                        doc="Run every stage in order on the embedded default (or your config): ingest, score-ref, "
                            "train, eval, report.")
