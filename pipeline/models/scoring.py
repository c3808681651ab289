"""``score_tokens``: log-probabilities of chosen tokens with the LM head applied to those rows only."""

from __future__ import annotations

import torch


def score_tokens(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    index: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """log p(targets[j] at position index[j]) as float32 [N]; differentiable.

    ``index`` is Long[N, 2] of (batch row, position).  The body runs once
    (``final_hidden``); the head and a float32 log-softmax run only on the N
    selected rows, ``chunk_size`` rows at a time, so peak memory is
    chunk_size x vocab instead of batch x seq x vocab.  With
    ``model.logits_shift`` (position i predicts token i+1) the prediction of
    position p is read from the hidden state at p - 1.
    """
    index = index.to(device=input_ids.device, dtype=torch.long)
    targets = targets.to(device=input_ids.device, dtype=torch.long)
    if index.ndim != 2 or index.shape[1] != 2 or targets.shape != (index.shape[0],):
        raise ValueError(f"index must be [N, 2] and targets [N]; got {tuple(index.shape)} and {tuple(targets.shape)}")
    rows, positions = index[:, 0], index[:, 1]
    base = _unwrap(model)
    if getattr(base, "logits_shift", False):
        if bool((positions < 1).any()):
            raise ValueError("logits_shift model: position 0 has no prediction (nothing precedes it)")
        positions = positions - 1
    if getattr(base, "supports_hidden_only", False):
        # Through the wrapper's own forward: DDP gradient sync, accelerate's
        # autocast and peft hooks all live there.
        hidden = model(input_ids, attention_mask=attention_mask, hidden_only=True).hidden_states
    else:
        hidden = base.final_hidden(input_ids, attention_mask)
    selected = hidden[rows, positions]  # [N, H]
    head = base.get_output_embeddings()
    out = []
    for start in range(0, selected.shape[0], chunk_size):
        logits = head(selected[start : start + chunk_size]).float()
        tgt = targets[start : start + chunk_size]
        # log_softmax gathered at the target, by the fused cross-entropy kernel
        # (a separate logsumexp makes several passes over rows x vocab).
        out.append(-torch.nn.functional.cross_entropy(logits, tgt, reduction="none"))
    if not out:
        return hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(out)


def _unwrap(model):
    """The model under DDP/FSDP-style ``.module`` wrappers (PeftModel forwards attributes itself)."""
    while not hasattr(model, "final_hidden") and hasattr(model, "module"):
        model = model.module
    return model
