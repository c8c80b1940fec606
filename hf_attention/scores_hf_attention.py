"""Scoring functions, one registered class per `attention_type`, and what every layer of a stack shares.

An `AttentionScore` owns the parameters of its scoring function and their initialisation, and turns
projected (and rotated) queries, keys and values into the attention output, calling the kernels through
transformers' attention interface as `LlamaAttention.forward` does. The layer around it is the same for
every scoring function (project, rotate, cache, score, output projection), so a new scoring function is
one subclass decorated with `@register_attention_score`: the config's choices, the variant grid, the
sweep, the recipes and conversion read `ATTENTION_SCORES`.

The class flags say what a scoring function can be combined with; the config refuses the rest with the
reason (`AttentionScore.check_config`).
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .attention_sparse import SparsePattern, flex_sparse_attention, sparse_attention
from .positions_hf_attention import POSITIONAL_ENCODINGS, PositionalEncoding, positional_encoding_class
from .validation_hf_attention import register_by_name, registered

ATTENTION_SCORES: dict[str, type["AttentionScore"]] = {}


def register_attention_score(cls: type["AttentionScore"]) -> type["AttentionScore"]:
    """Class decorator: make `cls` selectable as `attention_type=cls.name`."""
    return register_by_name(ATTENTION_SCORES, cls)


def attention_score_class(name: str) -> type["AttentionScore"]:
    return registered(ATTENTION_SCORES, "attention_type", name)


@dataclass
class AttentionInputs:
    """What every layer of one stack shares in a forward pass: masks, positions, rotary tables, score bias.

    Built once per forward by the stack; dense masks and score biases are computed lazily and cached here so
    layers that need them share one tensor and the fast kernels never build them.
    """

    q_positions: torch.Tensor  # [B|1, Lq] position ids of the queries
    k_positions: torch.Tensor  # [B|1, Lk] position ids of the keys
    key_padding_mask: torch.Tensor | None  # bool [B, Lk], True = real token; None = no padding
    causal: bool = False
    q_offset: int = 0  # index of the first query in the key sequence (cached decoding)
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None  # cos/sin for the queries
    rotary_keys: tuple[torch.Tensor, torch.Tensor] | None = None  # cos/sin for the new keys (same as queries)
    positions: PositionalEncoding | None = None  # the stack's score-bias encoding, if it has one
    pattern: SparsePattern | None = None
    # False under gradient checkpointing: each layer then computes the score bias inside its checkpointed
    # region, so the recomputation matches and the bias parameters get their gradient (one shared tensor,
    # built in the first layer's region, would be a stale no-grad copy or a recompute mismatch).
    share_bias: bool = True
    _cache: dict = field(default_factory=dict)

    @property
    def q_len(self) -> int:
        return self.q_positions.shape[-1]

    @property
    def k_len(self) -> int:
        return self.k_positions.shape[-1]

    @property
    def score_bias_fn(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """`k_pos - q_pos` -> [H, *S], for kernels that compute the bias per block; None without one."""
        return None if self.positions is None else self.positions.score_bias

    def bool_mask(self, device: torch.device) -> torch.Tensor | None:
        """[B|1, 1, Lq, Lk] True = attend (pattern, causality, padding), or None when everything attends."""
        if "bool" in self._cache:
            return self._cache["bool"]
        mask = None
        q_idx = torch.arange(self.q_len, device=device) + self.q_offset
        k_idx = torch.arange(self.k_len, device=device)
        causal = q_idx[:, None] >= k_idx[None, :]
        if self.pattern is not None:
            # On positions, not slots: padding cannot move blocks or make pad tokens global.
            mask = self.pattern.position_mask(
                self.q_positions.to(device), self.k_positions.to(device), self.causal
            )[:, None]
            mask = mask & causal if self.causal else mask
        elif self.causal and (self.q_len > 1 or self.q_offset + 1 != self.k_len):
            mask = causal[None, None]
        if self.key_padding_mask is not None:
            pad = self.key_padding_mask[:, None, None, :].to(device=device, dtype=torch.bool)
            mask = pad if mask is None else mask & pad
        self._cache["bool"] = mask
        return mask

    def float_mask(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        key = ("float", dtype)
        if key not in self._cache:
            mask = self.bool_mask(device)
            self._cache[key] = (
                None
                if mask is None
                else torch.zeros((), dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
            )
        return self._cache[key]

    def relative_positions(self) -> torch.Tensor:
        """k_pos - q_pos, [B|1, Lq, Lk]."""
        return self.k_positions[:, None, :] - self.q_positions[:, :, None]

    def score_bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        """[B|1, H, Lq, Lk] score bias of the positional encoding (recomputed per stack, shared by layers)."""
        if self.positions is None:
            return None
        key = ("bias", dtype)
        if key in self._cache:
            return self._cache[key]
        bias = self.positions.score_bias(self.relative_positions()).permute(1, 0, 2, 3).to(dtype)
        if self.share_bias:
            self._cache[key] = bias
        return bias

    def mask_with_bias(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        """Additive float mask plus score bias, for scoring functions that take one additive tensor."""
        mask, bias = self.float_mask(dtype, device), self.score_bias(dtype)
        if bias is None:
            return mask
        return bias if mask is None else mask + bias


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    position_bias: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(QK^T * scaling + mask + bias) V, with the probabilities returned (output_attentions).

    `position_bias` is transformers' name of the score-bias argument of its attention interface.
    """
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    if position_bias is not None:
        scores = scores + position_bias
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, probs


class AttentionScore(nn.Module):
    """Base class of a scoring function. Subclasses set `name` and override `forward` (and, with parameters,
    `__init__` and `init_weights`).

    Flags: `takes_score_bias` (a bias-type positional encoding can be added to its scores: it has a score
    matrix), `takes_sparse_pattern` (it can be restricted to a sparse pattern).
    """

    name: ClassVar[str] = ""
    has_parameters: ClassVar[bool] = False  # learned tensors (a variant transformers' own models cannot take)
    fast_kernel: ClassVar[bool] = True  # runs on a fused kernel (SDPA/flex); False: explicit scores, slow when long
    keeps_kv_cache: ClassVar[bool] = True  # False: it keeps its own state in the cache (`forward(..., cache=)`)
    rotates_itself: ClassVar[bool] = False  # True: it applies `inputs.rotary` itself (the layer does not rotate)
    weights_sum_to_one: ClassVar[bool] = True  # its (implied) attention weights are a distribution over keys
    takes_score_bias: ClassVar[bool] = True
    takes_sparse_pattern: ClassVar[bool] = True

    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5

    @classmethod
    def check_config(cls, config) -> None:
        """Refuse, with the reason, the combinations this scoring function cannot serve."""
        positions = positional_encoding_class(config.position_embedding_type)
        others = ", ".join(repr(n) for n, c in POSITIONAL_ENCODINGS.items() if not c.provides_score_bias)
        if positions.provides_score_bias and not cls.takes_score_bias:
            raise ValueError(
                f"attention_type={cls.name!r} has no score matrix to add a bias to, so position_embedding_type="
                f"{config.position_embedding_type!r} (a score bias) cannot be used with it; choose a positional type "
                f"that is not a score bias: {others}."
            )
        if config.sparse_pattern is not None and not cls.takes_sparse_pattern:
            raise ValueError(
                f"attention_type={cls.name!r} cannot be restricted to sparse_pattern={config.sparse_pattern!r}; "
                "use sparse_pattern=None (dense) with it."
            )

    def init_weights(self, config) -> None:
        """Initialise the scoring parameters (called from the model's `_init_weights`)."""

    def forward(
        self, attention: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        inputs: AttentionInputs, dropout: float = 0.0, output_attentions: bool = False, **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """q [B, H, Lq, D], k/v [B, H, Lk, D] -> (out [B, Lq, H, D], weights [B, H, Lq, Lk] or None).

        `kwargs` carries `cache` (the self-attention cache) for scores with `keeps_kv_cache = False`.
        """
        raise NotImplementedError


def kernel_name(attention: nn.Module, output_attentions: bool) -> str:
    """The config's `attn_implementation`, or eager when the weights are asked for."""
    return "eager" if output_attentions else (attention.config._attn_implementation or "sdpa")


@register_attention_score
class StandardScore(AttentionScore):
    """Scaled dot product, softmax(QK^T / sqrt(d) + bias) V (Vaswani et al.), on every kernel.

    With a sparse pattern, full forwards run the block-skipping kernels (FlexAttention on CUDA, the blocked
    SDPA kernel elsewhere); probabilities and cached decoding use the dense mask of the pattern.
    """

    name = "standard"

    def forward(self, attention, query, key, value, inputs, dropout=0.0, output_attentions=False, **kwargs):
        impl = kernel_name(attention, output_attentions)
        if self._use_sparse_kernel(attention, inputs, impl, query, key):
            if impl == "flex_attention" and query.device.type == "cuda":
                out = flex_sparse_attention(
                    query, key, value, inputs.pattern, causal=inputs.causal,
                    key_padding_mask=inputs.key_padding_mask, score_bias=inputs.score_bias_fn,
                    scaling=self.scaling, pattern_positions=inputs.q_positions,
                )
            else:
                out = sparse_attention(
                    query, key, value, inputs.pattern, causal=inputs.causal,
                    key_padding_mask=inputs.key_padding_mask, score_bias=inputs.score_bias_fn,
                    positions=inputs.q_positions, scaling=self.scaling, dropout=dropout, training=attention.training,
                    pattern_positions=inputs.q_positions,
                )
            return out, None
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager_attention_forward)
        if impl == "eager":
            interface = eager_attention_forward
        return interface(
            attention, query, key, value,
            attention_mask=inputs.float_mask(query.dtype, query.device),
            position_bias=inputs.score_bias(query.dtype),
            scaling=self.scaling, dropout=dropout,
            is_causal=inputs.causal and not attention.is_cross_attention,
        )

    @staticmethod
    def _use_sparse_kernel(attention, inputs: AttentionInputs, impl: str, query, key) -> bool:
        """The block-skipping kernels serve full forwards; probabilities and cached decoding use the dense mask."""
        return (
            inputs.pattern is not None
            and not attention.is_cross_attention
            and impl != "eager"
            and inputs.q_offset == 0
            and query.shape[-2] == key.shape[-2]
        )


@register_attention_score
class DotScore(StandardScore):
    """Unscaled dot product, softmax(QK^T + bias) V: the 1/sqrt(d) of Vaswani et al. left out, on every kernel."""

    name = "dot"

    def __init__(self, config):
        super().__init__(config)
        self.scaling = 1.0


__all__ = [
    "ATTENTION_SCORES",
    "DotScore",
    "AttentionInputs",
    "AttentionScore",
    "StandardScore",
    "attention_score_class",
    "eager_attention_forward",
    "register_attention_score",
]
