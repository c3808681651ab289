"""Native LLaDA: config and model in LLaDA's own checkpoint layout, no remote code.

The parameter names are exactly those of the published LLaDA checkpoints
(``model.transformer.wte.weight``, ``model.transformer.blocks.{i}.q_proj.weight``,
... , ``model.transformer.ff_out.weight``), so ``from_pretrained`` reads an
original LLaDA folder and ``save_pretrained`` writes one that loads wherever
an original checkpoint loads.  The forward pass follows
shared/reference/llada.md; on top of the published code it adds a key-padding
mask through ``scaled_dot_product_attention`` (bidirectional), Hugging Face
gradient checkpointing, and ``final_hidden`` so a scorer can apply the LM
head to a few rows only.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

try:  # transformers >= 4.48 checkpoints layers through this base class
    from transformers.modeling_layers import GradientCheckpointingLayer
except ImportError:  # pragma: no cover - older transformers
    GradientCheckpointingLayer = None


# LLaDA's config keys (``config.json`` of GSAI-ML/LLaDA-8B-*) and their defaults, LLaDA-8B's values;
# n_kv_heads None means n_heads.
_CONFIG_DEFAULTS = dict(
    d_model=4096, n_heads=32, n_kv_heads=None, n_layers=32, mlp_ratio=4, mlp_hidden_size=12288,
    activation_type="silu", block_type="llama", block_group_size=1,
    alibi=False, alibi_bias_max=8.0, rope=True, rope_full_precision=True, rope_theta=500000.0,
    flash_attention=False, attention_dropout=0.0, multi_query_attention=None, attention_layer_norm=False,
    residual_dropout=0.0, embedding_dropout=0.0, input_emb_norm=False,
    layer_norm_type="rms", layer_norm_with_affine=True, rms_norm_eps=1e-5, attention_layer_norm_with_affine=True,
    max_sequence_length=4096, include_bias=False, bias_for_layer_norm=False, include_qkv_bias=False,
    scale_logits=False, vocab_size=126464, embedding_size=126464, weight_tying=False, mask_token_id=126336,
    init_device=None, init_fn="mitchell", init_std=0.02, init_cutoff_factor=None, precision="amp_bf16",
    use_cache=False,
)


class LLaDAConfig(PretrainedConfig):
    """LLaDA's config keys (``config.json`` of GSAI-ML/LLaDA-8B-*), defaults = LLaDA-8B."""

    model_type = "llada"
    # transformers utilities (and peft) look for these generic names.
    attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads"}

    def __init__(self, eos_token_id: int = 126081, pad_token_id: int = 126081, **kwargs):
        for key, default in _CONFIG_DEFAULTS.items():
            setattr(self, key, kwargs.pop(key, default))
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        # LLaDA's key is ``weight_tying``; keep transformers' own tying flag in
        # step so it never ties ``ff_out`` to ``wte`` behind our back.
        kwargs["tie_word_embeddings"] = bool(self.weight_tying)
        super().__init__(eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)

    @property
    def padded_vocab_size(self) -> int:
        return self.embedding_size or self.vocab_size

    @property
    def ffn_hidden_size(self) -> int:
        return self.mlp_hidden_size if self.mlp_hidden_size is not None else self.mlp_ratio * self.d_model

    def check_supported(self) -> None:
        """Refuse the LLaDA options this implementation does not have (none are used by public checkpoints)."""
        flags = ("alibi", "input_emb_norm", "scale_logits", "include_bias", "include_qkv_bias",
                 "attention_layer_norm", "weight_tying")
        bad = [name for name in flags if getattr(self, name)] + ([] if self.rope else ["rope=false"])
        # LLaDA trains without dropout; silently ignoring one would be wrong
        bad += [f"{name}={getattr(self, name)}" for name in ("attention_dropout", "residual_dropout",
                                                             "embedding_dropout") if getattr(self, name, 0.0)]
        if bad:
            raise ValueError(f"LLaDA config option(s) not supported by the native model: {', '.join(bad)}")
        # LLaDA-8B's llama block computes silu(ff_proj(x)) * up_proj(x) with activation_type "silu". In
        # LLaDA's code "swiglu" is another activation (it splits its input in two), so it is refused, not
        # taken for plain SiLU.
        if self.block_type != "llama" or self.activation_type != "silu":
            raise ValueError(
                f"LLaDA block_type={self.block_type!r} activation_type={self.activation_type!r} not supported "
                "(only the llama block with activation_type 'silu' of LLaDA-8B)"
            )
        if self.layer_norm_type != "rms":
            raise ValueError(f"LLaDA layer_norm_type={self.layer_norm_type!r} not supported (only rms)")
        if self.d_model % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"d_model {self.d_model} must divide by n_heads {self.n_heads}, which must divide by "
                f"n_kv_heads {self.n_kv_heads}"
            )


class LLaDARMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back before the weight, as LLaDA does."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fused x * rsqrt(mean(x^2) + eps) in float32
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_tables(seq_len: int, head_dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [S, head_dim] in float32: angles for j < head_dim/2, concatenated with themselves."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    pos = torch.arange(seq_len, device=device, dtype=torch.float32)
    angles = torch.outer(pos, inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, D]; rotation in float32 (rope_full_precision), result in x's dtype."""
    x32 = x.float()
    return (x32 * cos + _rotate_half(x32) * sin).to(x.dtype)


_BlockBase = GradientCheckpointingLayer if GradientCheckpointingLayer is not None else nn.Module


class LLaDABlock(_BlockBase):
    """One llama-style block with LLaDA's module names."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        d, hidden = config.d_model, config.ffn_hidden_size
        self.n_heads, self.n_kv_heads = config.n_heads, config.n_kv_heads
        self.head_dim = d // config.n_heads
        self.attn_norm = LLaDARMSNorm(d, config.rms_norm_eps)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_norm = LLaDARMSNorm(d, config.rms_norm_eps)
        self.ff_proj = nn.Linear(d, hidden, bias=False)
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.ff_out = nn.Linear(hidden, d, bias=False)

    def _qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Queries, keys and values of x [B, S, d] after RoPE: [B, heads, S, head_dim] (keys/values kv heads)."""
        b, s, _ = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _attend_and_mlp(self, x, q, k, v, key_mask):
        b, s, _ = x.shape
        if self.n_kv_heads != self.n_heads:  # grouped-query attention: each kv head serves a run of q heads
            rep = self.n_heads // self.n_kv_heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, is_causal=False)
        x = x + self.attn_out(att.transpose(1, 2).reshape(b, s, -1))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key_mask: torch.Tensor | None):
        # Tensors go in positionally: GradientCheckpointingLayer checkpoints *args.
        q, k, v = self._qkv(x, cos, sin)
        return self._attend_and_mlp(x, q, k, v, key_mask)

    def forward_window(self, x, cos, sin, key_mask, cached: tuple[torch.Tensor, torch.Tensor] | None, start: int):
        """x holds positions [start, start + w) of the sequence; the keys and values of the other positions
        come from ``cached`` (k, v of the whole sequence, [B, kv heads, S, head_dim]; None: x is the whole
        sequence). Returns (output, (k, v) of the window's own positions)."""
        q, k, v = self._qkv(x, cos, sin)
        own = (k, v)
        if cached is not None:
            end = start + x.shape[1]
            ck, cv = cached
            k = torch.cat([ck[:, :, :start], k, ck[:, :, end:]], dim=2)
            v = torch.cat([cv[:, :, :start], v, cv[:, :, end:]], dim=2)
        return self._attend_and_mlp(x, q, k, v, key_mask), own


class LLaDAModel(nn.Module):
    """Holds ``transformer`` (wte, blocks, ln_f, ff_out) so weight names match LLaDA's."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(config.padded_vocab_size, config.d_model),
                "blocks": nn.ModuleList([LLaDABlock(config) for _ in range(config.n_layers)]),
                "ln_f": LLaDARMSNorm(config.d_model, config.rms_norm_eps),
                "ff_out": nn.Linear(config.d_model, config.padded_vocab_size, bias=False),
            }
        )


class LLaDAModelLM(PreTrainedModel):
    """LLaDA masked-diffusion LM; ``model(input_ids, attention_mask)`` -> ``.logits`` [B, S, V]."""

    config_class = LLaDAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LLaDABlock"]
    _supports_sdpa = True
    # Position i predicts token i (no autoregressive shift).
    logits_shift = False
    # forward(..., hidden_only=True) returns the final hidden state without the head.
    supports_hidden_only = True

    def __init__(self, config: LLaDAConfig):
        config.check_supported()
        super().__init__(config)
        self.model = LLaDAModel(config)
        self.gradient_checkpointing = False
        self.post_init()

    # -- transformers plumbing -------------------------------------------------
    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.transformer.wte = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.model.transformer.ff_out

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.model.transformer.ff_out = value

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs):
        """Checkpoint every block (non-reentrant by default); no deprecation noise on transformers 5."""
        if GradientCheckpointingLayer is None:  # pragma: no cover - older transformers
            return super().gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
        if hasattr(PreTrainedModel, "_activation_checkpointing_enable"):
            return self._activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)
        if gradient_checkpointing_kwargs is None:
            gradient_checkpointing_kwargs = {"use_reentrant": False}
        return super().gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)

    @property
    def is_gradient_checkpointing(self) -> bool:
        # Read by peft; transformers 5 deprecates the inherited name with a warning.
        return any(getattr(m, "gradient_checkpointing", False) for m in self.model.transformer.blocks)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Write LLaDA's layout; keep ``auto_map`` only together with the remote-code files it names."""
        super().save_pretrained(save_directory, *args, **kwargs)
        _carry_remote_code(self.config, save_directory)

    # -- forward ---------------------------------------------------------------
    def _embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, total: int, start: int = 0):
        """Embeddings of positions [start, start + w), their RoPE tables and the key padding mask."""
        if total > self.config.max_sequence_length:
            raise ValueError(f"sequence length {total} exceeds max_sequence_length {self.config.max_sequence_length}")
        x = self.model.transformer.wte(input_ids)
        head_dim = self.config.d_model // self.config.n_heads
        cos, sin = rope_tables(start + input_ids.shape[1], head_dim, self.config.rope_theta, x.device)
        return x, cos[start:], sin[start:], _key_padding_mask(attention_mask)

    def final_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states after ln_f, [B, S, d_model]; the LM head is not applied."""
        x, cos, sin, key_mask = self._embed(input_ids, attention_mask, input_ids.shape[1])
        for block in self.model.transformer.blocks:
            x = block(x, cos, sin, key_mask)
        return self.model.transformer.ln_f(x)

    def hidden_with_kv(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        kv_cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        start: int = 0,
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Final hidden states of a window of the sequence, attending to cached keys and values elsewhere.

        Without ``kv_cache``: ``input_ids`` [B, S] is the whole sequence, the result is ``final_hidden``'s
        and the keys and values of every layer come with it (the cache, [B, kv heads, S, head_dim] each,
        after RoPE). With ``kv_cache`` (such a list for a sequence of length S): ``input_ids`` [B, w] are
        the tokens at positions [start, start + w); their queries attend to their own fresh keys and values
        and to the cached ones of every other position (Fast-dLLM's approximate cache: prefix when the window
        runs to the end, dual when it stops before). ``attention_mask`` [B, S] always covers the whole
        sequence. Returns (hidden [B, w, d_model], the window's own keys and values per layer).
        """
        t = self.model.transformer
        _, w = input_ids.shape
        total = w if kv_cache is None else kv_cache[0][0].shape[2]
        if kv_cache is None and start:
            raise ValueError("hidden_with_kv: start > 0 needs a kv_cache for the positions before it")
        if start < 0 or start + w > total:
            raise ValueError(f"hidden_with_kv: window [{start}, {start + w}) outside the sequence of {total}")
        if kv_cache is not None and len(kv_cache) != len(t.blocks):
            raise ValueError(f"hidden_with_kv: kv_cache has {len(kv_cache)} layers, the model {len(t.blocks)}")
        x, cos, sin, key_mask = self._embed(input_ids, attention_mask, total, start)
        fresh = []
        for i, block in enumerate(t.blocks):
            x, own = block.forward_window(x, cos, sin, key_mask, None if kv_cache is None else kv_cache[i], start)
            fresh.append(own)
        return t.ln_f(x), fresh

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        hidden_only: bool = False,
        **kwargs,
    ) -> MaskedLMOutput:
        """``logits`` [B, S, V]; ``hidden_states``: the final hidden after ln_f (one tensor), when asked.
        ``hidden_only=True`` skips the head (``logits`` None): the path ``score_tokens`` takes so wrappers
        that act in ``forward`` (DDP, autocast) still apply."""
        hidden = self.final_hidden(input_ids, attention_mask)
        if hidden_only:
            return MaskedLMOutput(logits=None, hidden_states=hidden)
        logits = self.model.transformer.ff_out(hidden)
        return MaskedLMOutput(logits=logits, hidden_states=hidden if output_hidden_states else None)


def _key_padding_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """[B, S] 1/0 -> bool [B, 1, 1, S] (True = may attend), broadcast over heads and queries."""
    if attention_mask is None:
        return None
    keep = attention_mask.bool()
    if bool(keep.all()):
        # No padding: without a mask SDPA may pick its flash/efficient kernels.
        return None
    # A row of only padding would softmax over nothing (NaN); let it attend everywhere
    # instead — its outputs are padding and never read.
    keep = keep | ~keep.any(dim=-1, keepdim=True)
    return keep[:, None, None, :]


def _carry_remote_code(config: LLaDAConfig, save_directory) -> None:
    """A checkpoint loaded from the LLaDA release keeps its ``auto_map``; copy the .py files it names.

    Then the saved folder still loads with the published code (``trust_remote_code``)
    as well as with this class.  Without those files ``auto_map`` would point
    at nothing, so it is dropped from the saved config.json.
    """
    target = Path(save_directory)
    config_file = target / "config.json"
    if not config_file.is_file():
        return
    data = json.loads(config_file.read_text(encoding="utf-8"))
    auto_map = data.get("auto_map")
    if not auto_map:
        return
    source = Path(str(getattr(config, "_name_or_path", "") or ""))
    modules = {ref.split(".")[0] + ".py" for ref in auto_map.values() if isinstance(ref, str) and "." in ref}
    complete = True
    for name in modules:
        if (target / name).is_file():
            continue
        if source.is_dir() and (source / name).is_file():
            shutil.copyfile(source / name, target / name)
        else:
            complete = False
    if not complete:
        data.pop("auto_map")
        config_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


__all__ = ["LLaDAConfig", "LLaDAModelLM", "rope_tables", "apply_rope"]

# Lets AutoConfig/AutoModel resolve model_type "llada" to this code without remote code.
try:
    AutoConfig.register("llada", LLaDAConfig, exist_ok=True)
    AutoModel.register(LLaDAConfig, LLaDAModelLM, exist_ok=True)
    AutoModelForMaskedLM.register(LLaDAConfig, LLaDAModelLM, exist_ok=True)
except (TypeError, ValueError):  # pragma: no cover - another registration won
    pass
