"""2-D positional encodings over a grid of image patches.

One integer position id per token carries a patch's (row, col): ``p = row * GRID_STRIDE + col``, so the
1-D machinery (``AttentionInputs.relative_positions``, ``bias_fn(k_pos - q_pos)`` in the sparse kernels,
FlexAttention score mods) passes 2-D offsets through unchanged: ``rel = k_pos - q_pos`` decodes to
``drow = round(rel / GRID_STRIDE)``, ``dcol = rel - drow * GRID_STRIDE`` (unique while the grid is narrower
than ``GRID_STRIDE / 2``). Prefix tokens ([CLS]) get the reserved id ``CLS_POSITION``, far from every
patch: any ``rel`` with ``|rel| >= CLS_DISTANCE`` involves one of them and gets no bias. ([CLS] to itself
has ``rel = 0`` like every token's self-score, so it gets the zero-offset bias: 0 for ALiBi, the learned
(0, 0) entry for relative; the bias hooks see only ``rel``, and all kernels must agree.)

Meanings (``position_embedding_type``):
- ``sinusoidal``: the first ``ceil(d / 2)`` channels are the 1-D Vaswani table of the row, the rest the
  table of the column; [CLS] gets zeros.
- ``learned``: a ViT table (handled by the vision embeddings, not here).
- ``rope``: axial; the first ``ceil(d / 4)`` rotary pairs rotate by the row, the others by the column,
  each axis with its own 1-D RoPE frequencies; [CLS] is not rotated.
- ``alibi``: ``-slope_h * sqrt(drow^2 + dcol^2)`` (Euclidean patch distance), 1-D ALiBi slopes.
- ``relative``: T5 buckets per axis, one learned scalar per (row bucket, column bucket, head).
Nothing keeps a non-persistent buffer: tables come from the ids, so meta-device loading is right and
every non-learned type runs at any grid size.
"""

import torch
from torch import nn

from .positions_hf_attention import alibi_slopes, relative_position_bucket, sinusoidal_embedding

GRID_STRIDE = 2**16
CLS_POSITION = -(2**40)
CLS_DISTANCE = 2**39


def grid_position_ids(
    height: int, width: int, num_prefix_tokens: int = 0, device: torch.device | str | None = None,
    row_offset: int = 0, col_offset: int = 0,
) -> torch.Tensor:
    """[1, P + H * W] ids: P prefix tokens at ``CLS_POSITION``, then the patches in raster order.

    The offsets translate the whole grid (positions of a crop of a larger image).
    """
    if width >= GRID_STRIDE // 2 or height >= GRID_STRIDE // 2:
        raise ValueError(f"a {height}x{width} patch grid is too large for 2-D position ids (< {GRID_STRIDE // 2}).")
    rows = torch.arange(height, device=device).repeat_interleave(width) + row_offset
    cols = torch.arange(width, device=device).repeat(height) + col_offset
    prefix = torch.full((num_prefix_tokens,), CLS_POSITION, dtype=torch.long, device=device)
    return torch.cat([prefix, rows * GRID_STRIDE + cols])[None]


def decode_positions(position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Absolute ids -> (is_prefix, row, col); prefix tokens get row = col = 0."""
    position_ids = position_ids.long()
    is_prefix = position_ids <= -CLS_DISTANCE
    safe = position_ids.masked_fill(is_prefix, 0)
    row = torch.div(safe + GRID_STRIDE // 2, GRID_STRIDE, rounding_mode="floor")
    return is_prefix, row, safe - row * GRID_STRIDE


def decode_relative(relative_position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """rel = k_pos - q_pos -> (involves_prefix, drow, dcol); offsets are zeroed where a prefix token is involved."""
    relative_position = relative_position.long()
    involves_prefix = relative_position.abs() >= CLS_DISTANCE
    safe = relative_position.masked_fill(involves_prefix, 0)
    drow = torch.div(safe + GRID_STRIDE // 2, GRID_STRIDE, rounding_mode="floor")
    return involves_prefix, drow, safe - drow * GRID_STRIDE


def sinusoidal_embedding_2d(position_ids: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """[..., dim]: row table in the first ceil(dim / 2) channels, column table in the rest; zeros for [CLS]."""
    is_prefix, row, col = decode_positions(position_ids)
    row_dim = (dim + 1) // 2
    table = torch.cat(
        [sinusoidal_embedding(row, row_dim, base), sinusoidal_embedding(col, dim - row_dim, base)], dim=-1
    )
    return table.masked_fill(is_prefix.unsqueeze(-1), 0.0)


class SinusoidalPositionalEmbedding2D(nn.Module):
    """Fixed 2-D sinusoid added to patch embeddings; no parameters, any grid size."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return sinusoidal_embedding_2d(position_ids, self.hidden_size)


class RotaryEmbedding2D(nn.Module):
    """Axial RoPE in the rotate-half layout of `apply_rotary`: pair i is (x[i], x[i + D/2]).

    Pairs ``0 .. n_row - 1`` (``n_row = ceil(D / 4)``) rotate by ``row * theta^(-j / n_row)``, the remaining
    ``n_col`` pairs by ``col * theta^(-j / n_col)``: each axis is a 1-D RoPE of head dim ``2 * n_axis``, so
    q.k depends only on (drow, dcol).
    """

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        self.head_dim = head_dim
        self.theta = float(theta)
        pairs = head_dim // 2
        self.row_pairs, self.col_pairs = (pairs + 1) // 2, pairs // 2

    def _inv_freq(self, pairs: int, device) -> torch.Tensor:
        return self.theta ** (-torch.arange(pairs, device=device, dtype=torch.float32) / max(pairs, 1))

    def forward(
        self, position_ids: torch.Tensor, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, L] -> (cos, sin) [B, L, head_dim]; identity rotation for [CLS]."""
        is_prefix, row, col = decode_positions(position_ids)
        freqs = torch.cat(
            [
                row.to(torch.float32).unsqueeze(-1) * self._inv_freq(self.row_pairs, row.device),
                col.to(torch.float32).unsqueeze(-1) * self._inv_freq(self.col_pairs, col.device),
            ],
            dim=-1,
        ).masked_fill(is_prefix.unsqueeze(-1), 0.0)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


class AlibiBias2D(nn.Module):
    """2-D ALiBi: bias = -slope_h * Euclidean patch distance; 0 to and from [CLS]."""

    def __init__(self, num_heads: int):
        super().__init__()
        self.num_heads = num_heads

    def forward(self, relative_position: torch.Tensor) -> torch.Tensor:
        """relative_position (k_pos - q_pos) of any shape S -> bias [H, *S] (float32)."""
        involves_prefix, drow, dcol = decode_relative(relative_position)
        distance = torch.sqrt((drow * drow + dcol * dcol).to(torch.float32))
        slopes = alibi_slopes(self.num_heads).to(distance.device).view(-1, *([1] * distance.dim()))
        return (-slopes * distance).masked_fill(involves_prefix, 0.0)


class RelativePositionBias2D(nn.Module):
    """T5 buckets per axis (bidirectional), one learned scalar per (row bucket, col bucket, head).

    0 between [CLS] and patches; [CLS] to itself gets the (0, 0) entry, as every token's self-score does.
    """

    def __init__(self, num_heads: int, num_buckets: int, max_distance: int):
        super().__init__()
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.relative_attention_bias = nn.Embedding(num_buckets * num_buckets, num_heads)

    def bucket(self, relative_position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(flat bucket index row_bucket * num_buckets + col_bucket, involves_prefix)."""
        involves_prefix, drow, dcol = decode_relative(relative_position)
        row_bucket = relative_position_bucket(drow, True, self.num_buckets, self.max_distance)
        col_bucket = relative_position_bucket(dcol, True, self.num_buckets, self.max_distance)
        return row_bucket * self.num_buckets + col_bucket, involves_prefix

    def forward(self, relative_position: torch.Tensor) -> torch.Tensor:
        index, involves_prefix = self.bucket(relative_position)
        values = self.relative_attention_bias(index).masked_fill(involves_prefix.unsqueeze(-1), 0.0)  # [*S, H]
        return values.permute(-1, *range(values.dim() - 1))


def build_bias_module_2d(config) -> nn.Module | None:
    """The 2-D score-bias object for `config.position_embedding_type`, or None for the other types."""
    kind = config.position_embedding_type
    if kind == "alibi":
        return AlibiBias2D(config.num_attention_heads)
    if kind == "relative":
        return RelativePositionBias2D(
            config.num_attention_heads, config.relative_attention_num_buckets, config.relative_attention_max_distance
        )
    return None


__all__ = [
    "CLS_DISTANCE",
    "CLS_POSITION",
    "GRID_STRIDE",
    "AlibiBias2D",
    "RelativePositionBias2D",
    "RotaryEmbedding2D",
    "SinusoidalPositionalEmbedding2D",
    "build_bias_module_2d",
    "decode_positions",
    "decode_relative",
    "grid_position_ids",
    "sinusoidal_embedding_2d",
]
