"""``score_tokens``: log-probabilities of chosen tokens with the LM head applied to those rows only;
``MaskedRowScorer``: the same with float64 row sums, as ONE module call (what DDP and FSDP wrap)."""

from __future__ import annotations

import contextlib
import threading

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
    if _reusable_logits(selected, head):
        return _scored_in_place(selected, head.weight, targets, chunk_size)
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


ROWS_PER_WORKSPACE = 1 << 26
"""Elements (rows x vocabulary) of one no-grad head chunk on the CPU: 256 MiB of float32 per buffer."""


def _reusable_logits(selected: torch.Tensor, head) -> bool:
    """The no-grad CPU float32 head (a plain bias-free Linear, no autocast): computed in reused buffers."""
    return (not torch.is_grad_enabled() and selected.device.type == "cpu" and selected.dtype == torch.float32
            and type(head) is torch.nn.Linear and head.bias is None and head.weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu"))


_workspaces = threading.local()


@contextlib.contextmanager
def reused_head_buffers():
    """Within it, the no-grad CPU head's two buffers are allocated once and reused by every call in this thread
    (``elbo_terms`` holds it over its forward batches), then freed. Each call otherwise allocates them afresh, and
    glibc hands blocks this large back to the system, so every forward paid their page faults again (about a
    tenth of the head's time at LLaDA's vocabulary)."""
    stack = _workspaces.__dict__.setdefault("stack", [])
    stack.append({})
    try:
        yield
    finally:
        stack.pop()


def _head_buffers(rows: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two [rows, vocab] float32 buffers: views of the open ``reused_head_buffers`` workspace (remade only when a
    call needs more rows than it holds, so a pass's peak is its largest call's, as without it), or fresh ones."""
    stack = getattr(_workspaces, "stack", None)
    if not stack:
        return torch.empty(rows, vocab), torch.empty(rows, vocab)
    held = stack[-1]
    if held.get("vocab") != vocab or held["logits"].shape[0] < rows:
        held.clear()  # the smaller pair goes before the larger one is made
        held.update(vocab=vocab, logits=torch.empty(rows, vocab), logp=torch.empty(rows, vocab))
    return held["logits"][:rows], held["logp"][:rows]


def _scored_in_place(selected: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                     chunk_size: int) -> torch.Tensor:
    """``score_tokens``' head on the CPU without grad, in two buffers allocated once per call (once per pass inside
    ``reused_head_buffers``): the same matmul and log-softmax kernel as ``cross_entropy`` (then the target's
    entry), so the same numbers, bit for bit where a chunk holds the same rows. A fresh rows x vocabulary tensor
    per chunk costs its page faults each time (glibc hands large blocks back to the system): at LLaDA's 126,464
    words a third of the head's time. Chunks of at most ``ROWS_PER_WORKSPACE`` elements bound the two buffers
    (2 x 256 MiB)."""
    n, vocab = selected.shape[0], weight.shape[0]
    rows = max(1, min(chunk_size, n, ROWS_PER_WORKSPACE // max(vocab, 1)))
    logits, logp = _head_buffers(rows, vocab)
    out = torch.empty(n, dtype=torch.float32)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        part, part_logp = logits[: stop - start], logp[: stop - start]
        torch.matmul(selected[start:stop], weight.t(), out=part)
        torch.ops.aten._log_softmax.out(part, 1, False, out=part_logp)
        out[start:stop] = part_logp.gather(1, targets[start:stop, None]).squeeze(1)
    return out


class MaskedRowScorer(torch.nn.Module):
    """The policy's scoring forward in one ``forward``: body, LM head on the masked rows, float64 row sums.

    Sharded and data-parallel wrappers act in a module's ``forward`` (FSDP gathers
    a unit's weights in its pre-forward hook, DDP arms its gradient sync there).
    Applying the head outside that call, as ``score_tokens`` on a bare model
    would under a wrapper, would read the head's local shard; here the head
    runs inside the wrapped call, so FSDP (``fully_shard`` per block, embedding
    and head in their own units) and DDP see one forward per batch.
    """

    is_masked_row_scorer = True

    def __init__(self, model, chunk_size: int = 4096):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        # What accelerate's auto-wrap policy reads to find the blocks (LLaDABlock).
        self._no_split_modules = list(getattr(_unwrap(model), "_no_split_modules", None) or [])

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()

    def forward(self, input_ids, attention_mask, index, targets, n_rows: int) -> torch.Tensor:
        """Float64 [n_rows]: per batch row, the sum of log p(target) over its masked positions (fixed order)."""
        logp = score_tokens(self.model, input_ids, attention_mask, index, targets, chunk_size=self.chunk_size)
        sums = torch.zeros(int(n_rows), dtype=torch.float64, device=logp.device)
        return sums.index_add(0, index[:, 0].to(device=logp.device, dtype=torch.long), logp.to(torch.float64))


def as_row_scorer(model, chunk_size: int = 4096):
    """``model`` itself when it is a (possibly wrapped) MaskedRowScorer, else a scorer around it."""
    if getattr(model, "is_masked_row_scorer", False) or getattr(getattr(model, "module", None),
                                                                "is_masked_row_scorer", False):
        return model
    return MaskedRowScorer(model, chunk_size=chunk_size)


def _unwrap(model):
    """The model under DDP/FSDP-style ``.module`` wrappers (PeftModel forwards attributes itself)."""
    while not hasattr(model, "final_hidden"):
        if getattr(model, "is_masked_row_scorer", False):
            model = model.model
        elif hasattr(model, "module"):
            model = model.module
        else:
            break
    return model
