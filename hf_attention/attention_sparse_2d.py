"""Sparse patterns over a grid of image patches, as `SparsePattern` subclasses.

Sequence index ``i`` is a prefix token ([CLS]) when ``i < num_prefix_tokens``, else the patch at
``(row, col) = divmod(i - num_prefix_tokens, grid_width)`` (raster order). Prefix tokens attend and are
attended globally; every token attends itself. Sizes are in patches along each axis:
- ``local`` (``GridLocalPattern``): ``|drow| <= w and |dcol| <= w`` with ``w = sparse_window_size // 2``,
  a (2w+1) x (2w+1) neighbourhood (the 1-D local rule ``|i - j| <= window // 2`` on each axis);
- ``strided`` (``GridStridedPattern``): Child et al.'s two parts on each axis, ``(|drow| < s and
  |dcol| < s) or (drow % s == 0 and dcol % s == 0)`` with ``s = sparse_stride``: a local square plus a
  dilated lattice through the query;
- ``block`` (``GridBlockPattern``): BigBird on tiles of ``b x b`` patches (``b = sparse_block_size``):
  the 3 x 3 neighbouring tiles, the first ``max(sparse_num_global_tokens, num_prefix_tokens)`` tokens
  global both ways, and ``sparse_num_random_blocks`` random tiles per query tile, drawn from
  ``random.Random(f"{seed}:{tile}")`` among the non-neighbouring tiles of this grid.
``allowed`` is pure tensor ops, so the dense-mask path, FlexAttention and the generic layout builder of
`sparse_attention` (which derives key blocks from ``allowed``) all serve these patterns unchanged.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from typing import Any

import torch

from .attention_sparse import LRUCache, SparsePattern
from .positions_2d_hf_attention import decode_positions
from .validation_hf_attention import check_int_in_range, check_non_negative_int, check_positive_int

__all__ = ["GridBlockPattern", "GridLocalPattern", "GridPattern", "GridStridedPattern"]

_CACHE_SIZE = 32
# Keyed by (pattern, what, ...): equal patterns (frozen dataclasses) share their masks and tables.
_cached = LRUCache(_CACHE_SIZE)


@dataclasses.dataclass(frozen=True)
class GridPattern(SparsePattern):
    """Base: decodes sequence indices into grid coordinates; subclasses define ``grid_allowed``.

    ``name`` stays empty so these never shadow the 1-D patterns in ``make_sparse_pattern``'s registry.
    """

    grid_height: int = 1
    grid_width: int = 1
    num_prefix_tokens: int = 0

    def __post_init__(self) -> None:
        check_positive_int("grid_height", self.grid_height)
        check_positive_int("grid_width", self.grid_width)
        check_non_negative_int("num_prefix_tokens", self.num_prefix_tokens)

    @property
    def seq_len(self) -> int:
        return self.num_prefix_tokens + self.grid_height * self.grid_width

    def coords(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence index -> (row, col); prefix tokens get negative rows, indices past the grid rows >= H."""
        patch = idx - self.num_prefix_tokens
        row = torch.div(patch, self.grid_width, rounding_mode="floor")
        return row, patch - row * self.grid_width

    def pattern_index(self, positions: torch.Tensor) -> torch.Tensor:
        """2-D position ids (``grid_position_ids``) -> raster indices (prefix tokens share index 0).

        Equal to the slots exactly when the tokens sit in raster order, which is when the blocked kernel
        may use its slot layout.
        """
        is_prefix, row, col = decode_positions(positions)
        return torch.where(is_prefix, 0, self.num_prefix_tokens + row * self.grid_width + col)

    def _grid_rule(self, device: Any = None) -> Callable[..., torch.Tensor]:
        """``grid_allowed`` with any tables bound now."""
        return self.grid_allowed

    def position_mask_fn(self, causal: bool, seq_len: int, device: Any = None) -> Callable[..., torch.Tensor]:
        """The rule on the patches' decoded (row, col): a translated grid keeps its local/strided pattern."""
        rule = self._grid_rule(device)
        g = self.num_global()

        def allowed(q_pos, k_pos):
            q_prefix, qr, qc = decode_positions(q_pos)
            k_prefix, kr, kc = decode_positions(k_pos)
            q_idx, k_idx = self.pattern_index(q_pos), self.pattern_index(k_pos)
            out = (q_prefix | k_prefix).logical_not() & rule(qr, qc, kr, kc)
            out = out | ((q_idx >= 0) & (q_idx < g)) | ((k_idx >= 0) & (k_idx < g)) | (q_pos == k_pos)
            return out & (k_pos <= q_pos) if causal else out

        return allowed

    def num_global(self) -> int:
        return self.num_prefix_tokens

    def grid_allowed(self, qr, qc, kr, kc) -> torch.Tensor:
        raise NotImplementedError

    def allowed(self, q_idx, kv_idx, causal, *, seq_len=None):
        qr, qc = self.coords(q_idx)
        kr, kc = self.coords(kv_idx)
        g = self.num_global()
        out = self.grid_allowed(qr, qc, kr, kc) | (q_idx < g) | (kv_idx < g) | (q_idx == kv_idx)
        return out & (kv_idx <= q_idx) if causal else out

    def dense_queries(self, seq_len: int) -> int:
        return min(self.num_global(), seq_len)

    def query_block_size(self, seq_len: int, causal: bool) -> int:
        """About one grid row (a multiple of 16): a row of queries reads a few key rows."""
        return max(16, min(128, 16 * round(self.grid_width / 16)))

    def dense_mask(
        self, q_len: int, kv_len: int, *, q_offset: int = 0, causal: bool = False, device: Any = None
    ) -> torch.Tensor:
        """Cached per shape: every layer of a forward (and every forward) reuses one mask."""
        device = torch.device(device) if device is not None else torch.device("cpu")
        key = (self, "dense", q_len, kv_len, q_offset, bool(causal), str(device))
        build = super().dense_mask
        return _cached(key, lambda: build(q_len, kv_len, q_offset=q_offset, causal=causal, device=device))


@dataclasses.dataclass(frozen=True)
class GridLocalPattern(GridPattern):
    """2-D neighbourhood: ``|drow| <= window_size // 2 and |dcol| <= window_size // 2``."""

    window_size: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("window_size", self.window_size)

    @property
    def radius(self) -> int:
        return self.window_size // 2

    def grid_allowed(self, qr, qc, kr, kc):
        return ((qr - kr).abs() <= self.radius) & ((qc - kc).abs() <= self.radius)


@dataclasses.dataclass(frozen=True)
class GridStridedPattern(GridPattern):
    """Local ``stride x stride`` reach or the dilated lattice ``drow % s == 0 and dcol % s == 0``."""

    stride: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("stride", self.stride)

    def grid_allowed(self, qr, qc, kr, kc):
        dr, dc = qr - kr, qc - kc
        s = self.stride
        local = (dr.abs() < s) & (dc.abs() < s)
        lattice = (torch.remainder(dr, s) == 0) & (torch.remainder(dc, s) == 0)
        return local | lattice


@dataclasses.dataclass(frozen=True)
class GridBlockPattern(GridPattern):
    """BigBird on ``block_size x block_size`` tiles: 3 x 3 neighbouring tiles, global tokens, random tiles."""

    block_size: int = 2
    num_global_tokens: int = 0
    num_random_blocks: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("block_size", self.block_size)
        check_non_negative_int("num_global_tokens", self.num_global_tokens)
        check_non_negative_int("num_random_blocks", self.num_random_blocks)
        check_int_in_range("seed", self.seed, low=-(2**63))

    @property
    def tiles(self) -> tuple[int, int]:
        b = self.block_size
        return -(-self.grid_height // b), -(-self.grid_width // b)

    def num_global(self) -> int:
        return max(self.num_global_tokens, self.num_prefix_tokens)

    def random_tiles(self, device: Any = None) -> torch.Tensor:
        """LongTensor [num_tiles, r]: random key tiles of each query tile (padded with the tile itself)."""
        device = torch.device(device) if device is not None else torch.device("cpu")
        return _cached((self, "random", str(device)), lambda: self._draw(device))

    def _draw(self, device: Any) -> torch.Tensor:
        th, tw = self.tiles
        r = self.num_random_blocks
        rows = []
        for tile in range(th * tw):
            tr, tc = divmod(tile, tw)
            pool = [t for t in range(th * tw) if abs(t // tw - tr) > 1 or abs(t % tw - tc) > 1]
            drawn = random.Random(f"{self.seed}:{tile}").sample(pool, min(r, len(pool)))
            rows.append(drawn + [tile] * (r - len(drawn)))
        return torch.tensor(rows, dtype=torch.long, device=device).view(th * tw, r)

    def _tile(self, row: torch.Tensor, col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.div(row, self.block_size, rounding_mode="floor"), torch.div(
            col, self.block_size, rounding_mode="floor"
        )

    def _grid_allowed(self, qr, qc, kr, kc, table: torch.Tensor | None) -> torch.Tensor:
        qtr, qtc = self._tile(qr, qc)
        ktr, ktc = self._tile(kr, kc)
        out = ((qtr - ktr).abs() <= 1) & ((qtc - ktc).abs() <= 1)
        if table is not None:
            th, tw = self.tiles
            q_tile = qtr * tw + qtc
            inside = (qr >= 0) & (qtr < th)  # prefix tokens and padded indices past the grid read no row
            row = q_tile.clamp(0, th * tw - 1)
            k_tile = ktr * tw + ktc
            hit = table[row, 0] == k_tile
            for t in range(1, self.num_random_blocks):
                hit = hit | (table[row, t] == k_tile)
            out = out | (hit & inside & (kr >= 0))
        return out

    def grid_allowed(self, qr, qc, kr, kc):
        table = self.random_tiles(qr.device) if self.num_random_blocks else None
        return self._grid_allowed(qr, qc, kr, kc, table)

    def _grid_rule(self, device: Any = None) -> Callable[..., torch.Tensor]:
        table = self.random_tiles(device) if self.num_random_blocks else None
        return lambda qr, qc, kr, kc: self._grid_allowed(qr, qc, kr, kc, table)

    def mask_fn(self, causal: bool, seq_len: int, device: Any = None) -> Callable[..., torch.Tensor]:
        """Binds the random table now, outside a traced FlexAttention mask_mod."""
        table = self.random_tiles(device) if self.num_random_blocks else None
        g = self.num_global()

        def allowed(q_idx, kv_idx):
            qr, qc = self.coords(q_idx)
            kr, kc = self.coords(kv_idx)
            out = self._grid_allowed(qr, qc, kr, kc, table) | (q_idx < g) | (kv_idx < g) | (q_idx == kv_idx)
            return out & (kv_idx <= q_idx) if causal else out

        return allowed
