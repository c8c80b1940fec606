"""2-D positional encodings over a grid of image patches.

One integer position id per token carries a patch's (row, col): ``p = row * GRID_STRIDE + col``, so the
1-D machinery (``AttentionInputs.relative_positions``, ``score_bias(k_pos - q_pos)`` in the sparse kernels,
FlexAttention score mods) passes 2-D offsets through unchanged: ``rel = k_pos - q_pos`` decodes to
``drow = round(rel / GRID_STRIDE)``, ``dcol = rel - drow * GRID_STRIDE`` (unique while the grid is narrower
than ``GRID_STRIDE / 2``). Prefix tokens ([CLS]) get the reserved id ``CLS_POSITION``, far from every
patch: any ``rel`` with ``|rel| >= CLS_DISTANCE`` involves one of them and gets no bias. ([CLS] to itself
has ``rel = 0`` like every token's self-score, so it gets the zero-offset bias: 0 for ALiBi, the learned
(0, 0) entry for relative; the bias hooks see only ``rel``, and all kernels must agree.)

Meanings (``position_embedding_type``):
- ``sinusoidal``: the first ``ceil(d / 2)`` channels are the 1-D Vaswani table of the row, the rest the
  table of the column; [CLS] gets zeros.
- ``learned``: a ViT table over the prefix tokens and the patches, resampled bicubically for other grids.
- ``rope``: axial; the first ``ceil(d / 4)`` rotary pairs rotate by the row, the others by the column,
  each axis with its own 1-D RoPE frequencies; [CLS] is not rotated.
- ``alibi``: ``-slope_h * sqrt(drow^2 + dcol^2)`` (Euclidean patch distance), 1-D ALiBi slopes.
- ``relative``: T5 buckets per axis, one learned scalar per (row bucket, column bucket, head).
Nothing keeps a non-persistent buffer: tables come from the ids, so meta-device loading is right and
every non-learned type runs at any grid size.
"""

import torch
from torch import nn

from .positions_hf_attention import PositionalEncoding, alibi_slopes, relative_position_bucket, sinusoidal_embedding

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


class SinusoidalPositionalEmbedding2D(PositionalEncoding):
    """Fixed 2-D sinusoid added to patch embeddings; no parameters, any grid size."""

    adds_to_embeddings = True

    def __init__(self, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return sinusoidal_embedding_2d(position_ids, self.hidden_size)

    def grid_embedding(self, position_ids: torch.Tensor, grid: tuple[int, int], interpolate: bool) -> torch.Tensor:
        return self(position_ids)


def resample_position_table(
    table: torch.Tensor, num_prefix_tokens: int, grid: tuple[int, int], new_grid: tuple[int, int]
) -> torch.Tensor:
    """[1, P + h*w, D] -> [1, P + H*W, D]: the patch rows resampled bicubically (transformers' ViT and timm's
    `resample_abs_pos_embed`), the prefix rows kept. Used by the vision model and by checkpoint conversion."""
    if tuple(grid) == tuple(new_grid):
        return table
    prefix, patches = table[:, :num_prefix_tokens], table[:, num_prefix_tokens:]
    dim = table.shape[-1]
    patches = patches.reshape(1, grid[0], grid[1], dim).permute(0, 3, 1, 2)
    patches = nn.functional.interpolate(patches.float(), size=tuple(new_grid), mode="bicubic", align_corners=False)
    patches = patches.to(table.dtype).permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim)
    return torch.cat((prefix, patches), dim=1)


class LearnedPositionTable2D(PositionalEncoding):
    """ViT's learned table `weight` [1, P + grid^2, D], added by slot; other grids resample it on request."""

    adds_to_embeddings = True
    extrapolates = False

    def __init__(self, grid_size: int, num_prefix_tokens: int, hidden_size: int):
        super().__init__()
        self.grid_size = grid_size
        self.num_prefix_tokens = num_prefix_tokens
        self.weight = nn.Parameter(torch.zeros(1, num_prefix_tokens + grid_size**2, hidden_size))

    def table(self, grid: tuple[int, int]) -> torch.Tensor:
        """The table for another grid (unchanged at the native one)."""
        return resample_position_table(self.weight, self.num_prefix_tokens, (self.grid_size, self.grid_size), grid)

    def grid_embedding(self, position_ids: torch.Tensor, grid: tuple[int, int], interpolate: bool) -> torch.Tensor:
        if interpolate:
            return self.table(grid)
        if tuple(grid) != (self.grid_size, self.grid_size):
            raise ValueError(
                f"Input grid {grid[0]}x{grid[1]} patches doesn't match the learned position table "
                f"({self.grid_size}x{self.grid_size} patches); pass interpolate_pos_encoding=True to resample it, or "
                "use a positional type that runs at any size."
            )
        return self.weight


class RotaryEmbedding2D(PositionalEncoding):
    """Axial RoPE in the rotate-half layout of `apply_rotary`: pair i is (x[i], x[i + D/2]).

    Pairs ``0 .. n_row - 1`` (``n_row = ceil(D / 4)``) rotate by ``row * theta^(-j / n_row)``, the remaining
    ``n_col`` pairs by ``col * theta^(-j / n_col)``: each axis is a 1-D RoPE of head dim ``2 * n_axis``, so
    q.k depends only on (drow, dcol).
    """

    rotates_queries_and_keys = True

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

    def rotary_tables(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self(position_ids)


class AlibiBias2D(PositionalEncoding):
    """2-D ALiBi: bias = -slope_h * Euclidean patch distance; 0 to and from [CLS]."""

    provides_score_bias = True

    def __init__(self, num_heads: int):
        super().__init__()
        self.num_heads = num_heads

    def forward(self, relative_position: torch.Tensor) -> torch.Tensor:
        """relative_position (k_pos - q_pos) of any shape S -> bias [H, *S] (float32)."""
        involves_prefix, drow, dcol = decode_relative(relative_position)
        distance = torch.sqrt((drow * drow + dcol * dcol).to(torch.float32))
        slopes = alibi_slopes(self.num_heads).to(distance.device).view(-1, *([1] * distance.dim()))
        return (-slopes * distance).masked_fill(involves_prefix, 0.0)

    def score_bias(self, relative_position: torch.Tensor) -> torch.Tensor:
        return self(relative_position)


class RelativePositionBias2D(PositionalEncoding):
    """T5 buckets per axis (bidirectional), one learned scalar per (row bucket, col bucket, head).

    0 between [CLS] and patches; [CLS] to itself gets the (0, 0) entry, as every token's self-score does.
    """

    provides_score_bias = True

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

    def score_bias(self, relative_position: torch.Tensor) -> torch.Tensor:
        return self(relative_position)


__all__ = [
    "CLS_DISTANCE",
    "CLS_POSITION",
    "GRID_STRIDE",
    "AlibiBias2D",
    "LearnedPositionTable2D",
    "RelativePositionBias2D",
    "RotaryEmbedding2D",
    "SinusoidalPositionalEmbedding2D",
    "decode_positions",
    "decode_relative",
    "grid_position_ids",
    "resample_position_table",
    "sinusoidal_embedding_2d",
]
