"""The CPM-Bee transformer, all of it in this one file.

Computes exactly what OpenBMB's original implementation computes (tests/test_model.py checks the golden
forward and incremental outputs), with the original module names so released checkpoints load without
renaming: ``encoder.layers.N.self_att.self_attention.project_q``, ``ffn.ffn.w_in.w_0``, …

The architecture, leaf to root:

* ``CpmBeeLinear``: ``x @ W.T / sqrt(fan_in)``, no bias.
* ``CpmBeeLayerNorm``: RMSNorm, statistics in float32.
* ``CpmBeeEmbeddingExt``: ``E[id] / sqrt(D)`` then a rotary rotation by the token's *sub* index (not its
  position), which tells ``<mask_0>`` from ``<mask_1>``. The same weight is the output projection, plus one
  extra output column per ``(family, sub)`` pair of the batch (the ext table).
* ``CpmBeeBucketPositionBias``: a learned per-head bias from a bucket per (query, key) pair: a log-spaced
  relative-position bucket inside a segment, a segment-relation bucket (from ``cpmbee.prompt``) across.
* ``CpmBeeAttention`` / ``CpmBeeFeedForward`` (gated GELU) in pre-norm blocks whose residual is
  ``(h + f(h)) / 1.05``. ``mask_modules`` removes whole sub-blocks (pruned 5B/2B/1B).

Attention mask: a *context* key is visible to every query of its sample; a non-context key only to
non-context queries at the same or a later position (answers are generated left to right). The main sample
(``sample_ids == 0``) sees its in-context samples, they see only themselves; instances packed into one
row (``span``) never see each other.

One ``forward(input_ids, **inputs)`` serves training and decoding; the input tensors are named and
documented once, in ``cpmbee.inputs.CpmBeeInputs``. Without a cache and with ``length`` it is the training
forward (right padding, padded queries output zero attention); with a cache (``KVCache``, e.g.
``CpmBeeCache``) or without ``length`` it is the incremental forward: keys are the cached tokens plus the
new ones, and a key is padding iff its ``num_segments`` is 0 (generation left-pads).

Shapes: B batch, L new (query) tokens, K keys (cached + new), H heads, Dh head width, D hidden width,
F feed-forward width, V vocabulary, E ext columns, R segment-relation table width.

No sampling, JSON or parallelism here: see ``cpmbee.generation``, ``cpmbee.prompt``, ``cpmbee.train``;
the class users load (``cpmbee.CpmBeeForCausalLM``, with ``generate``) is ``cpmbee.hf``'s.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Protocol, cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from typing_extensions import Unpack

from .config import CpmBeeConfig
from .inputs import CpmBeeInputs, TokenMeta

__all__ = [
    "CpmBeeCache",
    "CpmBeeForCausalLMBase",
    "CpmBeeModel",
    "CpmBeePreTrainedModel",
    "CpmBeeTransformerBlock",
    "KVCache",
]


# ---------------------------------------------------------------------------------------------------- leaves
def _project(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``h @ weight.T`` for ``h (..., D)`` and ``weight (N, D)``.

    With few rows (decoding: one per beam) it is computed as ``(weight @ h.T).T``: the same arithmetic, but
    CPU BLAS runs that layout several times faster (a memory-bound ``N × D`` pass). The result is then a
    transposed view, which every consumer in this file accepts."""
    rows = h.numel() // h.shape[-1]
    if 0 < rows <= 32:
        # h as (rows, D) row-major, so h.T is column-major: BLAS is slow on a row-major (D, rows) operand.
        h_t = h.reshape(rows, -1).contiguous().t()
        return torch.mm(weight, h_t).t().view(*h.shape[:-1], weight.shape[0])
    return F.linear(h, weight)


def _dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    return F.dropout(x, p, True) if training and p > 0 else x


class CpmBeeLinear(nn.Linear):
    """Bias-free linear layer whose output is divided by ``sqrt(in_features)``.

    A subclass of ``nn.Linear`` so PEFT can wrap it; a LoRA delta is then added after the scaling, as
    OpenDelta's LoRA on the original model did (so merging must multiply the delta by ``sqrt(in)``).
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.scale = math.sqrt(in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _project(x, self.weight) / self.scale


class CpmBeeLayerNorm(nn.Module):
    """RMSNorm: ``x * rsqrt(mean(x²) + eps) * w`` with the statistics in float32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # the same arithmetic without two no-op casts (decoding is op-bound)
            return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps) * self.weight
        variance = x.to(torch.float32).pow(2).mean(dim=-1, keepdim=True)
        return (x * torch.rsqrt(variance + self.eps)).to(x.dtype) * self.weight


class CpmBeeRotaryEmbedding(nn.Module):
    """Rotation of embedding vectors by an integer index: ``theta_j = distance_scale * index * base^(-2j/D)``."""

    def __init__(self, dim: int, base: float = 10000.0, distance_scale: float = 16) -> None:
        super().__init__()
        self.dim = dim
        self.distance_scale = distance_scale
        # Built on the CPU in float32 so every device uses the same frequencies (the original's values).
        steps = torch.arange(
            0, dim, 2, dtype=torch.float32, device="cpu"
        )  # CPU even under a meta-device context
        self._inv_freq_cpu = 1.0 / (base ** (steps / dim))
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq:
            self._inv_freq[device] = self._inv_freq_cpu.to(device)
        return self._inv_freq[device]

    def forward(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        # x: (..., D), index: (...) integer
        angle = (index * self.distance_scale).to(torch.float32)[..., None] * self.inv_freq(
            x.device
        )  # (..., D/2)
        angle = torch.cat((angle, angle), dim=-1)  # (..., D)
        half = x.size(-1) // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return (x.float() * angle.cos() + rotated.float() * angle.sin()).to(x.dtype)


class CpmBeeEmbeddingExt(nn.Module):
    """Token embedding with sub-index rotation; also the (tied) output projection.

    ``forward(ids, subs)`` embeds. ``forward(ext_ids, ext_subs, hidden_states=h)`` projects ``h`` onto the
    vocabulary plus one column per ``(ext_id, ext_sub)`` pair. Both go through ``forward`` so that
    accelerate's hooks (device placement, offloading) apply to the projection too.
    """

    def __init__(self, vocab_size: int, dim: int, distance_scale: float = 16) -> None:
        super().__init__()
        self.dim = dim
        self.scale = math.sqrt(dim)
        self.weight = nn.Parameter(torch.empty(vocab_size, dim))
        self.rotary_emb = CpmBeeRotaryEmbedding(dim, distance_scale=distance_scale)

    def forward(
        self, ids: torch.Tensor, subs: torch.Tensor, hidden_states: torch.Tensor | None = None
    ) -> torch.Tensor:
        embeds: torch.Tensor = self.rotary_emb(
            F.embedding(ids, self.weight) / self.scale, subs
        )  # (*ids.shape, D)
        if hidden_states is None:
            return embeds
        h = hidden_states.to(self.weight.device)
        logits = _project(h / self.scale, self.weight)  # (B, L, V)
        if ids.numel() == 0:
            return logits
        return torch.cat([logits, F.linear(h, embeds)], dim=-1)  # (B, L, V + E)


class CpmBeeBucketPositionBias(nn.Module):
    """Per-head attention bias looked up by bucket.

    Buckets ``[0, num_buckets)`` are relative positions inside one segment (log-spaced beyond
    ``num_buckets / 4``, saturating at ``max_distance``); bucket ``num_buckets + r - 1`` is segment
    relation ``r ≥ 1`` (relation 1: another sample or packed instance).
    """

    def __init__(self, num_heads: int, num_buckets: int, num_segment_buckets: int, max_distance: int) -> None:
        super().__init__()
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.relative_attention_bias = nn.Parameter(torch.empty(num_buckets + num_segment_buckets, num_heads))

    def position_bucket(self, relative: torch.Tensor) -> torch.Tensor:
        """Bucket of ``key_pos - query_pos`` (the original's float32 formula, truncated toward zero)."""
        half = self.num_buckets // 2
        exact = half // 2
        base = (relative > 0).to(torch.int32) * half
        distance = relative.abs()
        log_bucket = exact + (
            torch.log(distance.float() / exact) / math.log(self.max_distance / exact) * (half - exact)
        ).to(torch.int32)
        log_bucket = log_bucket.clamp(max=half - 1)
        return base + torch.where(distance < exact, distance.to(torch.int32), log_bucket)

    def forward(
        self, query_pos: torch.Tensor, key_pos: torch.Tensor, segment_bucket: torch.Tensor
    ) -> torch.Tensor:
        # query_pos: (B, L), key_pos: (B, K), segment_bucket: (B, L, K) with 0 = same segment
        in_segment = self.position_bucket(key_pos[:, None, :] - query_pos[:, :, None])
        bucket = torch.where(segment_bucket == 0, in_segment, segment_bucket - 1 + self.num_buckets)
        bias = F.embedding(bucket.long(), self.relative_attention_bias)  # (B, L, K, H)
        return bias.permute(0, 3, 1, 2)  # (B, H, L, K)


# ---------------------------------------------------------------------------------------------------- cache
class KVCache(Protocol):
    """What a forward needs of a cache; ``CpmBeeCache`` is one, and a fixed-capacity (static) cache only has
    to provide the same three calls (see ``CpmBeeCache`` for their contract)."""

    def __len__(self) -> int: ...

    def append(self, meta: TokenMeta) -> TokenMeta: ...

    def update(
        self, layer: int, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


class CpmBeeCache:
    """Keys/values of every attention layer plus the ``TokenMeta`` of the cached tokens, for decoding.

    The interface a forward uses (any cache with these three calls works, e.g. a fixed-capacity one):

    * ``len(cache)`` — tokens already cached (the new tokens' default positions start there);
    * ``append(meta) -> TokenMeta`` — record the metadata of the ``L`` new tokens, return that of all keys
      (cached + new), which the mask and the position bias of the new queries read; called once per forward;
    * ``update(layer, key, value) -> (keys, values)`` — store the new tokens' ``(B, H, L, Dh)`` keys/values
      of one layer, return the layer's keys/values so far ``(B, H, K, Dh)``.

    Decoders also use ``reorder(index)`` (beams, rows leaving the batch). All rows share one length: a batch
    of prompts is left-padded (padding keys have ``valid == False``). Storage grows by doubling when a
    forward would overflow it (give ``max_length`` up front to avoid that); a layer's keys/values are
    allocated on that layer's device, so a model split across devices keeps each layer's cache local.
    """

    def __init__(self, num_layers: int, batch_size: int, max_length: int = 0, device: Any = None) -> None:
        self.num_layers = num_layers
        self.batch_size = batch_size
        self.capacity = max(int(max_length), 1)
        self.seq_length = 0
        self.device = torch.device(device) if device is not None else None
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.meta: dict[str, torch.Tensor] = {}
        self._pending: tuple[int, int] = (0, 0)

    def __len__(self) -> int:
        return self.seq_length

    def _grow(self, needed: int) -> None:
        new_capacity = max(needed, 2 * self.capacity)

        def grown(t: torch.Tensor, dim: int) -> torch.Tensor:
            shape = list(t.shape)
            shape[dim] = new_capacity
            out = t.new_zeros(shape)
            out.narrow(dim, 0, self.seq_length).copy_(t.narrow(dim, 0, self.seq_length))
            return out

        self.meta = {k: grown(v, 1) for k, v in self.meta.items()}
        self.keys = [None if k is None else grown(k, 2) for k in self.keys]
        self.values = [None if v is None else grown(v, 2) for v in self.values]
        self.capacity = new_capacity

    def append(self, meta: TokenMeta) -> TokenMeta:
        """Record the metadata of ``L`` new tokens; returns the metadata of all keys (cached + new)."""
        length = meta["position"].shape[1]
        start, end = self.seq_length, self.seq_length + length
        new = cast(Mapping[str, torch.Tensor], meta)
        if not self.meta:
            device = self.device or meta["position"].device
            self.meta = {
                k: torch.zeros(self.batch_size, self.capacity, dtype=v.dtype, device=device)
                for k, v in new.items()
            }
        if end > self.capacity:
            self._grow(end)
        for name, value in new.items():
            self.meta[name][:, start:end] = value
        self.seq_length = end
        self._pending = (start, end)
        m = self.meta
        return TokenMeta(
            position=m["position"][:, :end],
            context=m["context"][:, :end],
            sample_ids=m["sample_ids"][:, :end],
            segment=m["segment"][:, :end],
            span=m["span"][:, :end],
            valid=m["valid"][:, :end],
        )

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens' keys/values of one layer; returns the layer's keys/values so far."""
        # key, value: (B, H, L, Dh)
        start, end = self._pending
        k_store, v_store = self.keys[layer], self.values[layer]
        if k_store is None or v_store is None:
            b, h, _, d = key.shape
            k_store = self.keys[layer] = key.new_zeros(b, h, self.capacity, d)
            v_store = self.values[layer] = value.new_zeros(b, h, self.capacity, d)
        k_store[:, :, start:end] = key
        v_store[:, :, start:end] = value
        return k_store[:, :, :end], v_store[:, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` (beam search): row ``i`` becomes old row ``index[i]``. Batch size may change."""
        n = self.seq_length
        self.batch_size = int(index.shape[0])
        on_device: dict[torch.device, torch.Tensor] = {}

        def take(t: torch.Tensor, dim_len: int) -> torch.Tensor:
            idx = on_device.get(t.device)
            if idx is None:
                idx = on_device[t.device] = index.to(t.device)
            used = t.narrow(dim_len, 0, n)
            if idx.shape[0] != t.shape[0]:
                out = t.new_zeros((idx.shape[0], *t.shape[1:]))
                out.narrow(dim_len, 0, n).copy_(used[idx])
                return out
            # the gather copies first, so a row may be read after it has been overwritten
            used.copy_(used[idx])
            return t

        self.meta = {k: take(v, 1) for k, v in self.meta.items()}
        self.keys = [None if k is None else take(k, 2) for k in self.keys]
        self.values = [None if v is None else take(v, 2) for v in self.values]


# ---------------------------------------------------------------------------------------------------- blocks
class CpmBeeAttention(nn.Module):
    def __init__(self, config: CpmBeeConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.dim_head = config.dim_head
        width = config.num_attention_heads * config.dim_head
        self.project_q = CpmBeeLinear(config.hidden_size, width)
        self.project_k = CpmBeeLinear(config.hidden_size, width)
        self.project_v = CpmBeeLinear(config.hidden_size, width)
        self.attention_out = CpmBeeLinear(width, config.hidden_size)
        self.dropout_p = float(config.dropout_p)
        self.config = config

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        # x: (B, L, D); attn_bias: (B, H, L, K), -inf where attention is not allowed
        b, length, _ = x.shape
        q = self.project_q(x).view(b, length, self.num_heads, self.dim_head).transpose(1, 2)  # (B, H, L, Dh)
        k = self.project_k(x).view(b, length, self.num_heads, self.dim_head).transpose(1, 2)
        v = self.project_v(x).view(b, length, self.num_heads, self.dim_head).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, H, K, Dh)
        dropout = self.dropout_p if self.training else 0.0
        if self.config._attn_implementation == "eager":
            score = (
                torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.dim_head) + attn_bias
            )  # (B, H, L, K)
            probs = torch.softmax(score.float(), dim=-1).to(v.dtype)
            probs = _dropout(probs, dropout, self.training)
            out = torch.matmul(probs, v)
        else:
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=attn_bias if attn_bias.dtype == q.dtype else attn_bias.to(q.dtype),
                dropout_p=dropout,
                scale=1.0 / math.sqrt(self.dim_head),
            )
        out = out.transpose(1, 2).reshape(b, length, self.num_heads * self.dim_head)  # (B, L, H*Dh)
        projected: torch.Tensor = self.attention_out(out)
        return projected


class CpmBeeSelfAttentionBlock(nn.Module):
    def __init__(self, config: CpmBeeConfig, layer_idx: int) -> None:
        super().__init__()
        self.layernorm_before_attention = CpmBeeLayerNorm(config.hidden_size, config.eps)
        self.self_attention = CpmBeeAttention(config, layer_idx)
        self.dropout_p = float(config.dropout_p)

    def forward(
        self,
        h: torch.Tensor,
        attn_bias: torch.Tensor,
        query_ok: torch.Tensor | None,
        cache: KVCache | None,
    ) -> torch.Tensor:
        x = self.self_attention(self.layernorm_before_attention(h), attn_bias, cache)
        # A query that may attend to nothing (right padding) outputs zero, as in the original.
        if query_ok is not None:  # None: every query has a key
            x = torch.where(query_ok[:, :, None], x, 0.0)
        x = _dropout(x, self.dropout_p, self.training)
        return (h + x) / 1.05


class CpmBeeDenseGatedACT(nn.Module):
    def __init__(self, dim_in: int, dim_ff: int) -> None:
        super().__init__()
        self.w_0 = CpmBeeLinear(dim_in, dim_ff)
        self.w_1 = CpmBeeLinear(dim_in, dim_ff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.gelu(self.w_0(x)), self.w_1(x)
        out: torch.Tensor = gate * up  # (B, L, F)
        return out


class CpmBeeFeedForward(nn.Module):
    def __init__(self, config: CpmBeeConfig) -> None:
        super().__init__()
        self.w_in = CpmBeeDenseGatedACT(config.hidden_size, config.dim_ff)
        self.w_out = CpmBeeLinear(config.dim_ff, config.hidden_size)
        self.dropout_p = float(config.dropout_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.w_out(_dropout(self.w_in(x), self.dropout_p, self.training))
        return out


class CpmBeeFFNBlock(nn.Module):
    def __init__(self, config: CpmBeeConfig) -> None:
        super().__init__()
        self.layernorm_before_ffn = CpmBeeLayerNorm(config.hidden_size, config.eps)
        self.ffn = CpmBeeFeedForward(config)
        self.dropout_p = float(config.dropout_p)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = _dropout(self.ffn(self.layernorm_before_ffn(h)), self.dropout_p, self.training)
        return (h + x) / 1.05


class CpmBeeTransformerBlock(GradientCheckpointingLayer):
    """One layer: attention block then FFN block; either may be absent (``mask_modules``)."""

    def __init__(self, config: CpmBeeConfig, layer_idx: int) -> None:
        super().__init__()
        mask_att, mask_ffn = config.layer_masks()[layer_idx]
        self.mask_att, self.mask_ffn = mask_att, mask_ffn
        if not mask_att:
            self.self_att = CpmBeeSelfAttentionBlock(config, layer_idx)
        if not mask_ffn:
            self.ffn = CpmBeeFFNBlock(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attn_bias: torch.Tensor,
        query_ok: torch.Tensor | None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        if not self.mask_att:
            hidden_states = self.self_att(hidden_states, attn_bias, query_ok, cache)
        if not self.mask_ffn:
            hidden_states = self.ffn(hidden_states)
        return hidden_states


class CpmBeeEncoder(nn.Module):
    def __init__(self, config: CpmBeeConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            CpmBeeTransformerBlock(config, i) for i in range(config.num_hidden_layers)
        )
        self.output_layernorm = CpmBeeLayerNorm(config.hidden_size, config.eps)


# ---------------------------------------------------------------------------------------------------- models
class CpmBeePreTrainedModel(PreTrainedModel):
    config_class = CpmBeeConfig
    config: CpmBeeConfig
    base_model_prefix = "cpmbee"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["CpmBeeTransformerBlock"]
    _supports_sdpa = True
    _keys_to_ignore_on_load_unexpected = [r"lm_head\.weight", r"\.lora\.lin\."]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Random init as the original pre-training: linears N(0, init_std) (they are scaled by
        1/sqrt(fan_in)), embedding N(0, 0.02), position bias N(0, init_std), norms 1."""
        std = self.config.init_std
        if isinstance(module, CpmBeeLinear):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, CpmBeeEmbeddingExt):
            init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, CpmBeeBucketPositionBias):
            init.normal_(module.relative_attention_bias, mean=0.0, std=std)
        elif isinstance(module, CpmBeeLayerNorm):
            init.ones_(module.weight)

    @property
    def is_gradient_checkpointing(self) -> bool:
        """transformers' deprecated name of ``is_activation_checkpointing``, which PEFT still reads when it
        wraps a model; answered here without the deprecation warning."""
        return self.is_activation_checkpointing


def _bool_or(value: bool | None, default: bool) -> bool:
    return default if value is None else bool(value)


# transformers renamed the output field `past_key_values` to `cache`; outputs are built with the name this
# version has (the old name prints a deprecation warning on every forward of the newer versions).
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

# keywords that transformers' own callers (PEFT, the Trainer) may pass and that change nothing here
_TOLERATED = frozenset({"num_items_in_batch"})
_INPUT_NAMES = frozenset(CpmBeeInputs.__annotations__)


def _check_inputs(inputs: Mapping[str, Any]) -> None:
    """Refuse keywords ``forward`` would otherwise ignore (``None`` values are absent arguments)."""
    unknown = sorted(k for k, v in inputs.items() if v is not None and k not in _INPUT_NAMES | _TOLERATED)
    if "attention_mask" in unknown:
        raise ValueError(
            "CPM-Bee's forward takes no attention_mask: the mask is built from context/sample_ids/span/length"
            " (tokenizer(data) builds them; plain input_ids with an attention_mask are for generate())"
        )
    if unknown:
        raise TypeError(f"forward() got unexpected keyword argument(s) {unknown}")


def _one_cache(cache: KVCache | None, past_key_values: KVCache | None) -> KVCache | None:
    if past_key_values is not None and cache is not None and past_key_values is not cache:
        raise ValueError("give the cache once: `cache` (`past_key_values` is its older name)")
    return cache if cache is not None else past_key_values


def _filled(
    t: torch.Tensor | None,
    shape: tuple[int, int],
    value: int,
    device: torch.device,
    dtype: torch.dtype = torch.int32,
) -> torch.Tensor:
    """``t``, or a tensor of ``value`` when the input was not given (its documented default)."""
    return torch.full(shape, value, dtype=dtype, device=device) if t is None else t


def _new_tokens(
    inputs: CpmBeeInputs, shape: tuple[int, int], device: torch.device, start: int
) -> tuple[TokenMeta, torch.Tensor]:
    """The metadata of a forward's new tokens as queries (defaults filled in), and which of them are valid
    keys: positions before ``length`` in right-padded training rows, else ``num_segments != 0``."""
    b, n = shape
    position = inputs.get("position")
    if position is None:
        position = torch.arange(start, start + n, dtype=torch.int32, device=device).expand(b, -1)
    length = inputs.get("length")
    if length is not None:
        query_valid = key_valid = torch.arange(n, device=device)[None, :] < length.to(device)[:, None]
    else:
        query_valid = torch.ones(b, n, dtype=torch.bool, device=device)
        key_valid = _filled(inputs.get("num_segments"), shape, 1, device) != 0
    query = TokenMeta(
        position=position,
        context=_filled(inputs.get("context"), shape, 1, device, torch.bool).bool(),
        sample_ids=_filled(inputs.get("sample_ids"), shape, 0, device),
        segment=_filled(inputs.get("segment"), shape, 0, device),
        span=_filled(inputs.get("span"), shape, 0, device),
        valid=query_valid,
    )
    return query, key_valid


class CpmBeeModel(CpmBeePreTrainedModel):
    """The CPM-Bee transformer without the output projection; returns the final normalized hidden states."""

    def __init__(self, config: CpmBeeConfig) -> None:
        super().__init__(config)
        self.encoder = CpmBeeEncoder(config)
        self.input_embedding = CpmBeeEmbeddingExt(
            config.vocab_size, config.hidden_size, config.distance_scale
        )
        self.position_bias = CpmBeeBucketPositionBias(
            config.num_attention_heads,
            config.position_bias_num_buckets,
            config.position_bias_num_segment_buckets,
            config.position_bias_max_distance,
        )
        self.gradient_checkpointing = False
        self.post_init()  # type: ignore[no-untyped-call]

    def get_input_embeddings(self) -> CpmBeeEmbeddingExt:
        return self.input_embedding

    def set_input_embeddings(self, value: nn.Module) -> None:
        if not isinstance(value, CpmBeeEmbeddingExt):
            raise TypeError(f"the input embedding must be a CpmBeeEmbeddingExt, got {type(value).__name__}")
        self.input_embedding = value

    def attention_bias(
        self,
        query: TokenMeta,
        keys: TokenMeta,
        num_segments: torch.Tensor,
        segment_rel_offset: torch.Tensor,
        segment_rel: torch.Tensor,
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Additive attention bias ``(B, H, L, K)`` (-inf = not allowed) and the queries with any key ``(B, L)``.

        ``num_segments``/``segment_rel_offset`` are the queries' (they index ``segment_rel``).
        """
        q_sid, k_sid = query["sample_ids"][:, :, None], keys["sample_ids"][:, None, :]
        same_instance = (q_sid == k_sid) & (
            query["span"][:, :, None] == keys["span"][:, None, :]
        )  # (B, L, K)

        # segment relation bucket: segment_rel[b, seg_q * n_q + seg_k + offset_q] inside one instance, else 1
        index = (
            query["segment"][:, :, None] * num_segments[:, :, None]
            + keys["segment"][:, None, :]
            + segment_rel_offset[:, :, None]
        ).long()
        index = index.masked_fill(~same_instance, 0).clamp_(0, segment_rel.shape[1] - 1)
        b, length, k_len = index.shape
        segment_bucket = torch.gather(segment_rel.long(), 1, index.view(b, -1)).view(b, length, k_len)
        segment_bucket = segment_bucket.masked_fill(~same_instance, 1)
        bias = self.position_bias(query["position"], keys["position"], segment_bucket)  # (B, H, L, K)

        directional = keys["position"][:, None, :] <= query["position"][:, :, None]
        allowed = keys["context"][:, None, :] | (~query["context"][:, :, None] & directional)
        allowed &= (q_sid == 0) | (q_sid == k_sid)
        allowed &= query["span"][:, :, None] == keys["span"][:, None, :]
        allowed &= keys["valid"][:, None, :] & query["valid"][:, :, None]
        query_ok = allowed.any(dim=-1)  # (B, L)
        # A query with no key would give NaN (and NaN gradients); let it see everything, zero its output later.
        allowed |= ~query_ok[:, :, None]
        # contiguous once here rather than inside every layer's attention kernel
        bias = bias.to(dtype).masked_fill(~allowed[:, None], float("-inf")).contiguous()
        return bias, query_ok

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        cache: KVCache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: KVCache | None = None,
        **inputs: Unpack[CpmBeeInputs],
    ) -> BaseModelOutputWithPast:
        """Run the transformer over ``input_ids`` ``(B, L)``.

        Args:
            inputs: where each token sits in the structured prompt, ``cpmbee.inputs.CpmBeeInputs`` (built by
                ``cpmbee.prompt``). With ``length`` it is the training forward (right padding); without it,
                padding is ``num_segments == 0`` (left padding). ``ext_table_*`` are read by the LM head only.
            cache: a ``KVCache`` (``CpmBeeCache``) to read and extend (``past_key_values``: its older name).
            use_cache: return a cache (a new one when none is given).
        """
        _check_inputs(inputs)
        cache = _one_cache(cache, past_key_values)
        b, length_q = input_ids.shape
        device = input_ids.device
        use_cache = _bool_or(use_cache, False) or cache is not None
        if use_cache and cache is None:
            cache = CpmBeeCache(self.config.num_hidden_layers, b, length_q, device=device)
        length = inputs.get("length")
        if cache is not None and length is not None:
            raise ValueError("`length` describes right-padded training rows; it cannot be used with a cache")
        start = len(cache) if cache is not None else 0
        shape = (b, length_q)
        query, key_valid = _new_tokens(inputs, shape, device, start)
        new_keys = TokenMeta(**{**query, "valid": key_valid})
        keys = cache.append(new_keys) if cache is not None else new_keys
        num_segments = _filled(inputs.get("num_segments"), shape, 1, device)
        segment_rel = inputs.get("segment_rel")
        if segment_rel is None:
            segment_rel = torch.zeros(b, 1, dtype=torch.int32, device=device)

        hidden = self.input_embedding(
            input_ids, _filled(inputs.get("input_id_sub"), shape, 0, device)
        )  # (B, L, D)
        offset = _filled(inputs.get("segment_rel_offset"), shape, 0, device)
        attn_bias, query_ok = self.attention_bias(
            query, keys, num_segments, offset, segment_rel, hidden.dtype
        )
        checked_ok: torch.Tensor | None = query_ok
        if query_ok.device.type == "cpu" and not torch.compiler.is_compiling() and bool(query_ok.all()):
            # nothing to zero (decoding): the layers skip a masking op; checking is free on the CPU only
            checked_ok = None
        all_hidden = [hidden] if output_hidden_states else None
        for layer in self.encoder.layers:
            hidden = layer(hidden, attn_bias, checked_ok, cache)
            if all_hidden is not None:
                all_hidden.append(hidden)
        hidden = self.encoder.output_layernorm(hidden)
        if all_hidden is not None:
            all_hidden[-1] = hidden
        returned: dict[str, Any] = {_CACHE_FIELD: cache if use_cache else None}
        return BaseModelOutputWithPast(
            last_hidden_state=hidden,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            **returned,
        )


class CpmBeeForCausalLMBase(CpmBeePreTrainedModel):
    """CPM-Bee with the tied output projection (vocabulary + per-batch ext columns) and the LM loss.

    This is the network; ``cpmbee.hf.CpmBeeForCausalLM`` (exported as ``cpmbee.CpmBeeForCausalLM``, the class
    to load) adds ``generate`` in both call styles on top.
    """

    def __init__(self, config: CpmBeeConfig) -> None:
        super().__init__(config)
        self.cpmbee = CpmBeeModel(config)
        self.post_init()  # type: ignore[no-untyped-call]

    def get_input_embeddings(self) -> CpmBeeEmbeddingExt:
        return self.cpmbee.input_embedding

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.cpmbee.set_input_embeddings(value)

    def get_output_embeddings(self) -> None:
        return None  # the projection is the input embedding itself

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        cache: KVCache | None = None,
        use_cache: bool | None = None,
        labels: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: KVCache | None = None,
        **inputs: Unpack[CpmBeeInputs],
    ) -> CausalLMOutputWithPast:
        """Logits ``(B, L, V + E)`` over the vocabulary and the ``E`` ext columns; with ``labels`` (``-100`` =
        ignore, ``V + k`` = ext column ``k``) the mean cross-entropy as ``loss``. ``logits_to_keep = n > 0``
        computes logits for the last ``n`` positions only. Other arguments: see ``CpmBeeModel.forward``."""
        out: BaseModelOutputWithPast = self.cpmbee(
            input_ids,
            cache=_one_cache(cache, past_key_values),
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            **inputs,
        )
        hidden = out.last_hidden_state
        assert hidden is not None
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        ext_table_ids, ext_table_sub = inputs.get("ext_table_ids"), inputs.get("ext_table_sub")
        if ext_table_ids is None:
            ext_table_ids = ext_table_sub = torch.zeros(0, dtype=torch.int32, device=hidden.device)
        elif ext_table_sub is None:
            raise ValueError("ext_table_sub is required with ext_table_ids")
        logits = self.cpmbee.input_embedding(ext_table_ids, ext_table_sub, hidden_states=hidden)

        loss = None
        if labels is not None:
            if logits_to_keep:
                labels = labels[:, -logits_to_keep:]
            labels = labels.to(logits.device).long()
            if labels.numel() and int(labels.max()) >= logits.shape[-1]:
                raise ValueError(
                    f"labels reach {int(labels.max())} but there are {logits.shape[-1]} output columns"
                )
            total = F.cross_entropy(
                logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
            )
            loss = total / (labels != -100).sum().clamp(min=1)
        returned: dict[str, Any] = {_CACHE_FIELD: getattr(out, _CACHE_FIELD)}
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=out.hidden_states, **returned)
