"""The lm-evaluation-harness adapter on local tasks: our ELBO for loglikelihood, our sampler for generation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is the [eval] extra")

from pipeline.estimator.diffusion import ScoreRequest, elbo_terms, mask_seed, sample_masks  # noqa: E402
from pipeline.models import load_model  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
MC_ITEMS = [
    {"question": "What is 2 + 3?", "options": ["5", "6", "23"], "answer": 0},
    {"question": "What is 10 - 4?", "options": ["14", "6"], "answer": 1},
]
GEN_ITEMS = [{"question": "What is 7 + 1?", "answer": "8"}, {"question": "Name a colour.", "answer": "red"}]
STOP = "@@@@"  # never produced: completions are compared whole


def write_tasks(root: Path) -> Path:
    """Two lm-eval tasks on local JSONL files: multiple choice (loglikelihood) and generate_until."""
    root.mkdir(parents=True, exist_ok=True)
    for name, items in (("mc", MC_ITEMS), ("gen", GEN_ITEMS)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))
    (root / "lldm_test_mc.yaml").write_text(f"""task: lldm_test_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{options}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
""")
    (root / "lldm_test_gen.yaml").write_text(f"""task: lldm_test_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / 'gen.jsonl'}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: answer
generation_kwargs:
  until: ["{STOP}"]
  do_sample: false
metric_list:
  - metric: exact_match
""")
    return root


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return write_tasks(tmp_path_factory.mktemp("lm_eval_tasks"))


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _evaluate(lm, tasks_dir, names, chat=False):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    # Only the local tasks: indexing lm-eval's built-in task files is slow and not what is tested here.
    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    return simple_evaluate(model=lm, tasks=names, task_manager=manager, log_samples=True, bootstrap_iters=0,
                           apply_chat_template=chat)


def test_loglikelihood_is_our_elbo_of_the_continuation(tasks):
    from pipeline.evaluation.lm_eval_model import LLDMEvalModel, request_key

    model, tok = load_model("micro")
    lm = LLDMEvalModel(model=model, tokenizer=tok, mc_samples=4, seed=3)
    out = _evaluate(lm, tasks, ["lldm_test_mc"])
    samples = out["samples"]["lldm_test_mc"]
    assert len(samples) == len(MC_ITEMS)
    values = []
    for s in samples:
        for (context, continuation), resp in zip(s["arguments"], s["resps"]):
            # The same request through our estimator by hand: joint encoding, seeded masks, ELBO terms.
            whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
            n_ctx = len(tok(context, add_special_tokens=False)["input_ids"])
            ctx, cont = whole[:n_ctx], whole[n_ctx:]
            ms = sample_masks(len(cont), 4, mask_seed(3, request_key("loglikelihood", context, continuation),
                                                      "continuation", 0))
            with torch.no_grad():
                terms = elbo_terms(model, [ScoreRequest(ctx, cont, ms.masks, ms.weights)],
                                   mask_token_id=tok.mask_token_id, pad_token_id=tok.pad_token_id)
            ll = float(resp[0][0])
            assert ll == pytest.approx(float(terms[0].mean()), rel=1e-6, abs=1e-6)
            values.append(ll)
    assert len(set(values)) == len(values)  # every option scored on its own
    acc = out["results"]["lldm_test_mc"]["acc,none"]
    expected = sum(int(max(range(len(s["resps"])), key=lambda j: s["resps"][j][0][0]) == s["target"])
                   for s in samples) / len(samples)
    assert acc == pytest.approx(expected)


@pytest.mark.parametrize("temperature, chat", [(0.0, False), (0.7, False), (0.0, True)])
def test_generation_equals_lldm_dpo_generate(tasks, tmp_path, temperature, chat):
    """Same prompt and settings, same completion; with lm-eval's --apply_chat_template the prompt is rendered
    as `generate --chat-template` renders it (one user turn, pipeline.data.prompts)."""
    from pipeline.evaluation.lm_eval_model import LLDMEvalModel
    from stages.generate import GenerateConfig
    from stages.generate import run as generate

    items = GEN_ITEMS if temperature == 0.0 else GEN_ITEMS[:1]  # sampled noise is seeded by the prompt's index
    model, tok = load_model("micro")
    lm = LLDMEvalModel(model=model, tokenizer=tok, gen_length=16, block_length=8, steps=8, seed=5,
                       temperature=temperature)
    task_dir = write_tasks(tmp_path / "tasks") if temperature else tasks
    if temperature:
        (task_dir / "gen.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))
    out = _evaluate(lm, task_dir, ["lldm_test_gen"], chat=chat)
    got = {s["doc"]["question"]: s["resps"][0][0] for s in out["samples"]["lldm_test_gen"]}

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": it["question"]}) + "\n" for it in items))
    res = generate(GenerateConfig(model="micro", prompts=str(prompts), out=str(tmp_path / "gen.jsonl"),
                                  gen_length=16, block_length=8, steps=8, seed=5, temperature=temperature,
                                  chat_template=chat, device="cpu", progress=False))
    want = {json.loads(line)["prompt"]: json.loads(line)["completion"]
            for line in Path(res.out).read_text().splitlines()}
    assert got == want
    assert any(v for v in got.values())  # something was generated


def test_unknown_model_argument_is_one_line(tasks):
    from pipeline.core.errors import UserError
    from pipeline.evaluation.lm_eval_model import LLDMEvalModel

    with pytest.raises(UserError, match="unknown model argument\\(s\\) nonsense"):
        LLDMEvalModel(pretrained="micro", nonsense=1)
    with pytest.raises(UserError, match="gen_length 20 must be a multiple of block_length 8"):
        LLDMEvalModel(pretrained="micro", gen_length=20, block_length=8)


@pytest.mark.slow
def test_lm_eval_command_line_with_model_lldm(tasks, tmp_path):
    """`python -m pipeline.evaluation.lm_eval_model` is lm-eval's own command line with --model lldm registered."""
    out = tmp_path / "results"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "pipeline.evaluation.lm_eval_model", "--model", "lldm", "--model_args",
                           "pretrained=micro,mc_samples=2", "--tasks", "lldm_test_mc", "--include_path", str(tasks),
                           "--device", "cpu", "--output_path", str(out)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = list(out.rglob("results_*.json"))
    assert found, proc.stdout[-2000:]
    results = json.loads(found[0].read_text())["results"]["lldm_test_mc"]
    assert 0.0 <= results["acc,none"] <= 1.0


MASK = 9


def _scripted(table):
    """A 'model' whose logits at each continuation position depend on what is committed so far:
    ``table[committed tuple] = {position: (token, probability)}``, the rest of the probability spread evenly."""
    vocab = 10

    def predict(ids):
        key = tuple(ids[2:])  # context of 2 tokens, then the continuation (MASK where uncommitted)
        logits = torch.full((len(ids), vocab), -1e9)
        for pos, (token, p) in table[key].items():
            probs = torch.full((vocab,), (1 - p) / (vocab - 1))
            probs[token] = p
            logits[pos] = probs.log()
        return logits

    return predict


def test_suffix_greedy_prediction_hand_worked():
    from pipeline.evaluation.lm_eval_model import suffix_greedy_prediction

    ctx, cont = [1, 2], [5, 6]
    # Both masked: position 2 says 5 (p 0.9), position 3 says 7 (p 0.6). One argmax pass reads [5, 7] (not
    # greedy); LLaDA's harness commits the most confident first (position 2 = 5), and with it known position 3
    # says 6 (p 0.8): [5, 6], greedy.
    predict = _scripted({(MASK, MASK): {2: (5, 0.9), 3: (7, 0.6)}, (5, MASK): {3: (6, 0.8)}})
    assert suffix_greedy_prediction(predict, ctx, cont, MASK) is True
    one_pass = predict(ctx + [MASK, MASK])[2:].argmax(-1).tolist()
    assert one_pass == [5, 7]  # what the old single-pass is_greedy compared: False
    # The other way round: one pass reads [5, 6], but the more confident position 3 (6, p 0.95) is committed
    # first and then position 2 says 4: not greedy.
    predict = _scripted({(MASK, MASK): {2: (5, 0.7), 3: (6, 0.95)}, (MASK, 6): {2: (4, 0.5)}})
    assert predict(ctx + [MASK, MASK])[2:].argmax(-1).tolist() == [5, 6]
    assert suffix_greedy_prediction(predict, ctx, cont, MASK) is False
    # A tie of confidence (the same row twice) commits the leftmost position first.
    predict = _scripted({(MASK, MASK): {2: (5, 0.5), 3: (5, 0.5)}, (5, MASK): {3: (6, 0.9)},
                         (MASK, 5): {2: (4, 0.9)}})
    assert suffix_greedy_prediction(predict, ctx, cont, MASK) is True


def test_is_greedy_takes_one_pass_per_continuation_token():
    from pipeline.evaluation.lm_eval_model import LLDMEvalModel

    model, tok = load_model("micro")
    lm = LLDMEvalModel(model=model, tokenizer=tok, mc_samples=2)
    calls = []
    real = model.forward

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    model.forward = counting
    ctx = tok("What is 2 + 3?", add_special_tokens=False)["input_ids"]
    cont = tok(" 5 apples", add_special_tokens=False)["input_ids"]
    result = lm._is_greedy(ctx, cont)
    assert isinstance(result, bool) and len(calls) == len(cont)
