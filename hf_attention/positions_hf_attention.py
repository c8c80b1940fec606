"""Positional encodings, one registered class per `position_embedding_type`.

Every class answers the questions the layers ask, and only the one that applies to it: an absolute
embedding for these positions (`embedding`, added to the input embeddings), rotary tables for q/k
(`rotary_tables`), or a score bias for these relative positions (`score_bias`, `k_pos - q_pos` ->
[H, *S]); plus its maximum length and its 2-D form over a grid of image patches (`grid_form`).
Nothing here keeps a non-persistent buffer: tables are computed from the positions on the fly, so models
built on the meta device by `from_pretrained` are right and every non-learned type runs past the
training length.

A new type is one subclass decorated with `@register_positional_encoding`; the config's choices, the
variant grid, the sweep and the recipes read `POSITIONAL_ENCODINGS`.
"""

import math
from typing import ClassVar

import torch
from torch import nn

from .validation_hf_attention import register_by_name, registered

POSITIONAL_ENCODINGS: dict[str, type["PositionalEncoding"]] = {}


def register_positional_encoding(cls: type["PositionalEncoding"]) -> type["PositionalEncoding"]:
    """Class decorator: make `cls` selectable as `position_embedding_type=cls.name`."""
    return register_by_name(POSITIONAL_ENCODINGS, cls)


def positional_encoding_class(name: str) -> type["PositionalEncoding"]:
    return registered(POSITIONAL_ENCODINGS, "position_embedding_type", name)


def extrapolating_types() -> str:
    """For error messages: the registered types that run past the training length."""
    return ", ".join(repr(n) for n, c in POSITIONAL_ENCODINGS.items() if c.extrapolates and c.name != "none")


class PositionalEncoding(nn.Module):
    """Base class. Subclasses set the class flags and override the one question they answer.

    Flags: `adds_to_embeddings` (absolute: the embeddings module owns it), `rotates_queries_and_keys`,
    `provides_score_bias` (the stack owns these two and shares one per forward across layers),
    `extrapolates` (runs past `max_position_embeddings`), `scales_embedding` (the default of
    `config.scale_embedding`: Vaswani et al. scale token embeddings under a fixed unit-amplitude table).
    """

    name: ClassVar[str] = ""
    has_parameters: ClassVar[bool] = False  # learned tensors (a variant transformers' own models cannot take)
    adds_to_embeddings: ClassVar[bool] = False
    rotates_queries_and_keys: ClassVar[bool] = False
    provides_score_bias: ClassVar[bool] = False
    extrapolates: ClassVar[bool] = True
    scales_embedding: ClassVar[bool] = False

    @classmethod
    def from_config(cls, config, bidirectional: bool = True) -> "PositionalEncoding":
        return cls()

    @classmethod
    def grid_form(cls, config, num_prefix_tokens: int) -> "PositionalEncoding":
        """The 2-D form over an image-patch grid (see positions_2d_hf_attention.py)."""
        raise ValueError(
            f"position_embedding_type={cls.name!r} has no 2-D form for a patch grid, so the vision models cannot use "
            f"it; choose one of {', '.join(repr(n) for n, c in POSITIONAL_ENCODINGS.items() if c.has_grid_form())}."
        )

    @classmethod
    def has_grid_form(cls) -> bool:
        return cls.grid_form.__func__ is not PositionalEncoding.grid_form.__func__

    @classmethod
    def check_config(cls, config) -> None:
        """Raise a ValueError for a config this type cannot serve."""

    def max_length(self) -> int | None:
        """The longest sequence it can encode, or None (any length)."""
        return None

    def embedding(self, position_ids: torch.Tensor) -> torch.Tensor | None:
        """[B, L] -> [B, L, hidden] added to the input embeddings (absolute types)."""
        return None

    def rotary_tables(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """[B, L] -> (cos, sin) [B, L, head_dim] for `apply_rotary` (rotary types)."""
        return None

    def score_bias(self, relative_position: torch.Tensor) -> torch.Tensor | None:
        """k_pos - q_pos of any shape S -> [H, *S] added to the scores (score-bias types)."""
        return None


def sinusoidal_embedding(positions: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """Vaswani et al.: PE(pos, 2i) = sin(pos / base^(2i/d)), PE(pos, 2i+1) = cos(pos / base^(2i/d))."""
    half = (dim + 1) // 2
    exponent = torch.arange(half, device=positions.device, dtype=torch.float32) * 2.0 / dim
    angles = positions.to(torch.float32).unsqueeze(-1) / (base**exponent)
    table = torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)
    return table[..., :dim]


@register_positional_encoding
class SinusoidalPositionalEmbedding(PositionalEncoding):
    """Fixed sinusoid added to token embeddings; no parameters, any length."""

    name = "sinusoidal"
    adds_to_embeddings = True
    scales_embedding = True

    def __init__(self, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size

    @classmethod
    def from_config(cls, config, bidirectional: bool = True) -> "SinusoidalPositionalEmbedding":
        return cls(config.hidden_size)

    @classmethod
    def grid_form(cls, config, num_prefix_tokens: int) -> PositionalEncoding:
        from .positions_2d_hf_attention import SinusoidalPositionalEmbedding2D

        return SinusoidalPositionalEmbedding2D(config.hidden_size)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return sinusoidal_embedding(position_ids, self.hidden_size)

    def embedding(self, position_ids: torch.Tensor) -> torch.Tensor:
        return self(position_ids)


@register_positional_encoding
class LearnedPositionalEmbedding(PositionalEncoding, nn.Embedding):
    """A learned table (BERT/ViT); positions past the table are an error, never a silent wrap."""

    name = "learned"
    has_parameters = True
    adds_to_embeddings = True
    extrapolates = False

    @classmethod
    def from_config(cls, config, bidirectional: bool = True) -> "LearnedPositionalEmbedding":
        return cls(config.max_position_embeddings, config.hidden_size)

    @classmethod
    def grid_form(cls, config, num_prefix_tokens: int) -> PositionalEncoding:
        from .positions_2d_hf_attention import LearnedPositionTable2D

        return LearnedPositionTable2D(config.image_size // config.patch_size, num_prefix_tokens, config.hidden_size)

    def max_length(self) -> int:
        return self.num_embeddings

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        if position_ids.numel():
            bad = position_ids[(position_ids < 0) | (position_ids >= self.num_embeddings)]
            if bad.numel():  # name the offending id itself (a negative one is not "past the end")
                raise ValueError(
                    f"position id {int(bad[0])} is outside the learned position table of size {self.num_embeddings} "
                    f"(max_position_embeddings): ids must be in [0, {self.num_embeddings - 1}]. Truncate the input "
                    f"to {self.num_embeddings} tokens, or use a positional type that extrapolates: "
                    f"{extrapolating_types()}."
                )
        return super().forward(position_ids)

    def embedding(self, position_ids: torch.Tensor) -> torch.Tensor:
        return self(position_ids)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@register_positional_encoding
class RotaryEmbedding(PositionalEncoding):
    """RoPE (Su et al.) in the rotate-half layout of transformers' Llama, so Llama weights need no permutation."""

    name = "rope"
    rotates_queries_and_keys = True

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        self.head_dim = head_dim
        self.theta = float(theta)

    @classmethod
    def from_config(cls, config, bidirectional: bool = True) -> "RotaryEmbedding":
        return cls(config.head_dim, config.rope_theta)

    @classmethod
    def grid_form(cls, config, num_prefix_tokens: int) -> PositionalEncoding:
        from .positions_2d_hf_attention import RotaryEmbedding2D

        return RotaryEmbedding2D(config.head_dim, config.rope_theta)

    @classmethod
    def check_config(cls, config) -> None:
        if config.head_dim % 2 != 0:
            raise ValueError(
                f"position_embedding_type={cls.name!r} needs an even head dimension, got {config.head_dim}."
            )

    def forward(
        self, position_ids: torch.Tensor, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, L] -> (cos, sin) [B, L, head_dim], computed in float32."""
        inv_freq = 1.0 / (
            self.theta
            ** (torch.arange(0, self.head_dim, 2, device=position_ids.device, dtype=torch.float32) / self.head_dim)
        )
        freqs = position_ids.to(torch.float32).unsqueeze(-1) * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def rotary_tables(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self(position_ids)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, L, D]; cos/sin [B, L, D] (broadcast over heads)."""
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    return x * cos + rotate_half(x) * sin


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """Press et al.: geometric slopes 2^(-8i/n), with the interleaved extension for non-powers of two."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest != num_heads:
        extra_base = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        extra = min(closest, num_heads - closest)
        slopes += [extra_base ** (i + 1) for i in range(0, 2 * extra, 2)]
    return torch.tensor(slopes, dtype=torch.float32)


@register_positional_encoding
class AlibiBias(PositionalEncoding):
    """ALiBi: bias = -slope_h * |k_pos - q_pos|; symmetric for encoders, the same formula under a causal mask."""

    name = "alibi"
    provides_score_bias = True

    def __init__(self, num_heads: int):
        super().__init__()
        self.num_heads = num_heads

    @classmethod
    def from_config(cls, config, bidirectional: bool = True) -> "AlibiBias":
        return cls(config.num_attention_heads)

    @classmethod
    def grid_form(cls, config, num_prefix_tokens: int) -> PositionalEncoding:
        from .positions_2d_hf_attention import AlibiBias2D

        return AlibiBias2D(config.num_attention_heads)

    def forward(self, relative_position: torch.Tensor) -> torch.Tensor:
        """relative_position (k_pos - q_pos) of any shape S -> bias [H, *S] (float32)."""
        slopes = alibi_slopes(self.num_heads).to(relative_position.device)
        slopes = slopes.view(-1, *([1] * relative_position.dim()))
        return -slopes * relative_position.abs().to(torch.float32)

    def score_bias(self, relative_position: torch.Tensor) -> torch.Tensor:
        return self(relative_position)


def relative_position_bucket(
    relative_position: torch.Tensor, bidirectional: bool = True, num_buckets: int = 32, max_distance: int = 128
) -> torch.Tensor:
    """T5's buckets: exact for small distances, logarithmic up to max_distance, one bucket beyond."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).to(torch.long) * num_buckets
        relative_position = relative_position.abs()
    else:
        relative_position = -torch.clamp(relative_position, max=0)
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    scaled = torch.log(relative_position.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (scaled * (num_buckets - max_exact)).to(torch.long)
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(is_small, relative_position, large)


@register_positional_encoding
class RelativePositionBias(PositionalEncoding):
    """T5-style bucketed relative bias, one learned scalar per (bucket, head)."""

    name = "relative"
    has_parameters = True
    provides_score_bias = True

    def __init__(self, num_heads: int, num_buckets: int, max_distance: int, bidirectional: bool = True):
        super().__init__()
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.bidirectional = bidirectional
        self.relative_attention_bias = nn.Embedding(num_buckets, num_heads)

    @classmethod
    def from_config(cls, config, bidirectional: bool = True) -> "RelativePositionBias":
        return cls(config.num_attention_heads, config.relative_attention_num_buckets,
                   config.relative_attention_max_distance, bidirectional=bidirectional)

    @classmethod
    def grid_form(cls, config, num_prefix_tokens: int) -> PositionalEncoding:
        from .positions_2d_hf_attention import RelativePositionBias2D

        return RelativePositionBias2D(
            config.num_attention_heads, config.relative_attention_num_buckets, config.relative_attention_max_distance
        )

    @classmethod
    def check_config(cls, config) -> None:
        if config.relative_attention_num_buckets < 2:
            raise ValueError(
                f"relative_attention_num_buckets={config.relative_attention_num_buckets} is too small; use at least 2."
            )

    def forward(self, relative_position: torch.Tensor) -> torch.Tensor:
        buckets = relative_position_bucket(
            relative_position, self.bidirectional, self.num_buckets, self.max_distance
        )
        values = self.relative_attention_bias(buckets)  # [*S, H]
        return values.permute(-1, *range(values.dim() - 1))

    def score_bias(self, relative_position: torch.Tensor) -> torch.Tensor:
        return self(relative_position)


@register_positional_encoding
class NoPositionalEncoding(PositionalEncoding):
    """No positional information at all (a bag of tokens, or causal masking alone for decoders)."""

    name = "none"

    @classmethod
    def grid_form(cls, config, num_prefix_tokens: int) -> PositionalEncoding:
        return cls()
