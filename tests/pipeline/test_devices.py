"""One device resolver and one dtype table for every stage."""

from __future__ import annotations

import pytest
import torch

from pipeline.devices import DTYPE_NAMES, resolve_device, torch_dtype
from pipeline.errors import UserError


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
