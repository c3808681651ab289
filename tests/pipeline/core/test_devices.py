"""One device resolver and one dtype table for every stage."""

from __future__ import annotations

import pytest
import torch

from pipeline.core.devices import DTYPE_NAMES, resolve_device, torch_dtype
from pipeline.core.errors import UserError


def test_dtype_names_and_short_forms():
    assert [torch_dtype(n) for n in DTYPE_NAMES] == [torch.float32, torch.bfloat16, torch.float16]
    assert torch_dtype("bf16") is torch.bfloat16 and torch_dtype("torch.float16") is torch.float16
    assert torch_dtype(torch.float32) is torch.float32
    with pytest.raises(UserError, match="unknown dtype 'int8'"):
        torch_dtype("int8")


def test_auto_is_the_process_device_and_cuda_needs_cuda():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve_device("cuda:0")
    with pytest.raises(UserError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")


def test_auto_is_accelerates_process_device_for_every_caller(monkeypatch):
    """One meaning of ``auto``: accelerate's device for this process (cuda:LOCAL_RANK under accelerate launch),
    asked of ``process_state``; make-pairs' sampler resolves through the same function (no resolver of its own)."""
    import types

    import pipeline.core.devices as devices
    import pipeline.sampling.make_pairs_run
    import pipeline.sampling.selfpairs

    asked = []
    monkeypatch.setattr(devices, "process_state", lambda device="auto": asked.append(device) or
                        types.SimpleNamespace(device=torch.device("meta")))
    assert resolve_device("auto") == torch.device("meta") and asked == ["auto"]
    assert not hasattr(pipeline.sampling.selfpairs, "resolve_device")

    class Loaded(Exception):
        pass

    def fake_load(model, numerics, device, **kw):
        raise Loaded(device)

    monkeypatch.setattr("pipeline.models.load", fake_load)
    cfg = types.SimpleNamespace(device="auto", model="micro", dtype="float32", load_in_4bit=False,
                                trust_remote_code=False)
    with pytest.raises(Loaded) as got:
        pipeline.sampling.make_pairs_run.load_sampler(cfg, None)
    assert got.value.args[0] == torch.device("meta") and asked == ["auto", "auto"]
