"""What ``lldm-dpo run``'s single pass (stages.run_all) and its rounds (stages.run_rounds) share: the stages'
configs loaded and validated in order, and score-ref -> train -> eval -> report chained (each stage timed by
pipeline.core.progress.stage_timer). A composer: it imports the stages it runs."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from pipeline.cli.loading import load_config
from pipeline.core.errors import CacheMismatch, UserError

REPO_ROOT = Path(__file__).resolve().parents[1]


def stage_classes() -> dict[str, type]:
    """Each section's stage config class (imported here: the stages load torch, which `run --help` need not)."""
    from stages.evaluate import EvalConfig
    from stages.ingest import IngestConfig
    from stages.make_pairs import MakePairsConfig
    from stages.score_ref import ScoreRefConfig
    from stages.train import TrainConfig

    return {"ingest": IngestConfig, "score_ref": ScoreRefConfig, "train": TrainConfig, "eval": EvalConfig,
            "make_pairs": MakePairsConfig}


def shipped_path(path: str) -> str:
    """Paths of the shipped data resolve against the repository when absent from the working directory."""
    p = Path(path)
    if not p.is_absolute() and not p.exists() and (REPO_ROOT / p).exists():
        return str(REPO_ROOT / p)
    return path


def load_stages(where: str, **sections: dict) -> tuple:
    """The named stages' configs, validated in the order given (eval's shipped benchmark and choices found)."""
    for key in ("benchmark", "choices"):
        if sections.get("eval", {}).get(key):
            sections["eval"][key] = shipped_path(sections["eval"][key])
    classes = stage_classes()
    return tuple(load_config(classes[name], values=values, origin=f"{where}: {name}")
                 for name, values in sections.items())


def planned_epochs(score_cfg, train_cfg) -> int:
    """Epochs the train stage will start on the pairs score-ref is about to score (one process)."""
    from pipeline.core.schemas import DEFAULT_SPLIT, split_of
    from pipeline.data.pairsfile import read_pairs
    from pipeline.trainer.dpo_checks import epochs_needed

    table = read_pairs(score_cfg.pairs)
    if score_cfg.limit:
        table = table.slice(0, score_cfg.limit)
    splits = table.column("split").to_pylist() if "split" in table.column_names else ["train"] * table.num_rows
    n_train = sum(split_of(s) == DEFAULT_SPLIT for s in splits)
    return epochs_needed(max(n_train, 1), train_cfg)


def score_train_eval(cfg, timed, score_cfg, train_cfg, eval_cfg):
    """The stages after ingest, as `run` and each round chain them: score-ref (unless its section sets draws,
    one mask draw per epoch training will start: train refuses fewer), train, eval and the report. Their
    results, the report's paths last (None without ``cfg.report``)."""
    from pipeline.report.visual import write_report
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
