"""Positional encodings: absolute (sinusoidal, learned), rotary, and score biases (ALiBi, T5 relative).

Each type is one object the attention layer asks for what it needs: absolute types add to the input
embeddings, rotary rotates q/k, bias types map relative distances to a per-head score bias. Nothing here
keeps a non-persistent buffer: tables are computed from the positions on the fly, so models built on the
meta device by `from_pretrained` are right and every non-learned type runs past the training length.
"""

import math

import torch
from torch import nn


def sinusoidal_embedding(positions: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """Vaswani et al.: PE(pos, 2i) = sin(pos / base^(2i/d)), PE(pos, 2i+1) = cos(pos / base^(2i/d))."""
    half = (dim + 1) // 2
    exponent = torch.arange(half, device=positions.device, dtype=torch.float32) * 2.0 / dim
    angles = positions.to(torch.float32).unsqueeze(-1) / (base**exponent)
    table = torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)
    return table[..., :dim]


class SinusoidalPositionalEmbedding(nn.Module):
    """Fixed sinusoid added to token embeddings; no parameters, any length."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return sinusoidal_embedding(position_ids, self.hidden_size)


class LearnedPositionalEmbedding(nn.Embedding):
    """A learned table (BERT/ViT); positions past the table are an error, never a silent wrap."""

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        if position_ids.numel() and (int(position_ids.max()) >= self.num_embeddings or int(position_ids.min()) < 0):
            raise ValueError(
                f"position id {int(position_ids.max())} is outside the learned position table of size "
                f"{self.num_embeddings} (max_position_embeddings). Truncate the input to {self.num_embeddings} "
                "tokens, or use a positional type that extrapolates: 'sinusoidal', 'rope', 'alibi', 'relative'."
            )
        return super().forward(position_ids)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """RoPE (Su et al.) in the rotate-half layout of transformers' Llama, so Llama weights need no permutation."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        self.head_dim = head_dim
        self.theta = float(theta)

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


class AlibiBias(nn.Module):
    """ALiBi: bias = -slope_h * |k_pos - q_pos|; symmetric for encoders, the same formula under a causal mask."""

    def __init__(self, num_heads: int):
        super().__init__()
        self.num_heads = num_heads

    def forward(self, relative_position: torch.Tensor) -> torch.Tensor:
        """relative_position (k_pos - q_pos) of any shape S -> bias [H, *S] (float32)."""
        slopes = alibi_slopes(self.num_heads).to(relative_position.device)
        slopes = slopes.view(-1, *([1] * relative_position.dim()))
        return -slopes * relative_position.abs().to(torch.float32)


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


class RelativePositionBias(nn.Module):
    """T5-style bucketed relative bias, one learned scalar per (bucket, head)."""

    def __init__(self, num_heads: int, num_buckets: int, max_distance: int, bidirectional: bool = True):
        super().__init__()
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.bidirectional = bidirectional
        self.relative_attention_bias = nn.Embedding(num_buckets, num_heads)

    def forward(self, relative_position: torch.Tensor) -> torch.Tensor:
        buckets = relative_position_bucket(
            relative_position, self.bidirectional, self.num_buckets, self.max_distance
        )
        values = self.relative_attention_bias(buckets)  # [*S, H]
        return values.permute(-1, *range(values.dim() - 1))


ABSOLUTE_POSITION_TYPES = ("sinusoidal", "learned")
BIAS_POSITION_TYPES = ("alibi", "relative")


def build_bias_module(config, bidirectional: bool) -> nn.Module | None:
    """The score-bias object for `config.position_embedding_type`, or None for the other types."""
    kind = config.position_embedding_type
    if kind == "alibi":
        return AlibiBias(config.num_attention_heads)
    if kind == "relative":
        return RelativePositionBias(
            config.num_attention_heads,
            config.relative_attention_num_buckets,
            config.relative_attention_max_distance,
            bidirectional=bidirectional,
        )
    return None
