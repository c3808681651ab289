"""score-ref's reuse and `run`'s refusals (issue 24, item 4): a cache is reused for the same pairs read from
another folder, and `run` gives advice that works for `run`."""

from __future__ import annotations

import shutil

import pytest

from pipeline.core.errors import CacheMismatch, UserError
from stages.score_ref import ScoreRefConfig
from stages.score_ref import run as score_ref


def test_a_cache_is_reused_for_the_same_pairs_ingested_from_another_folder(tmp_path):
    from stages.ingest import IngestConfig
    from stages.ingest import run as ingest
    from tests.conftest import write_arithmetic_pairs

    src = write_arithmetic_pairs(tmp_path / "data.jsonl", 8)
    (tmp_path / "copy").mkdir()
    shutil.copy(src, tmp_path / "copy" / "data.jsonl")
    one, two = tmp_path / "one.arrow", tmp_path / "two.arrow"
    ingest(IngestConfig(inputs=[str(src)], out=str(one), progress=False))
    ingest(IngestConfig(inputs=[str(tmp_path / "copy" / "data.jsonl")], out=str(two), progress=False))
    kw = dict(model="micro", out=tmp_path / "scores", samples=1, device="cpu", progress=False)
    score_ref(ScoreRefConfig(pairs=one, **kw))
    again = score_ref(ScoreRefConfig(pairs=two, **kw))
    assert again.reused and again.scored_now == 0


def test_run_gives_run_advice_when_the_cache_was_made_otherwise(tmp_path, monkeypatch):
    from stages import run_all
    from stages import score_ref as score_ref_stage

    def mismatch(cfg):
        raise CacheMismatch(f"{cfg.out}: existing cache was made with different settings (samples: cache has 2, "
                            "this run has 4); use --overwrite to replace it or choose another --out",
                            f"{cfg.out}: existing cache was made with different settings (samples: cache has 2, "
                            "this run has 4)")

    monkeypatch.setattr(score_ref_stage, "run", mismatch)
    default = run_all.read_config_file(run_all.EMBEDDED_DEFAULT)
    # the untrained micro model answers nothing right (strict #### grading): the reference-solution fallback
    # gives make-pairs pairs to hand to score-ref, on a few questions
    make_pairs = {**default["make_pairs"], "limit": 8, "reference_solution_fallback": True,
                  "solution_field": "solution"}
    cfg = run_all.load_config(run_all.RunConfig, values={**default, "make_pairs": make_pairs,
                                                          "out": str(tmp_path / "out"), "model": "micro",
                                                          "device": "cpu"})
    with pytest.raises(UserError) as err:
        run_all.run(cfg, log=lambda *_: None)
    message = str(err.value)
    assert "samples: cache has 2, this run has 4" in message
    assert "--score-ref '{overwrite: true}'" in message and "use --overwrite" not in message
