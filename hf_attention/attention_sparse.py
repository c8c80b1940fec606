"""Sparse attention patterns (local, strided, block) and kernels that really skip the masked work.

A pattern is one small object: ``allowed(q_idx, kv_idx, causal)`` is the element rule (pure tensor
ops, so it doubles as a FlexAttention ``mask_mod`` body) and a few hints tell the blocked kernel how
to cover it. ``sparse_attention`` splits the sequence into query blocks, gathers for each block only
the key blocks the pattern can reach, applies the exact element mask there and runs one batched
SDPA/matmul over all blocks (no Python loop over blocks). Periodic parts that are not block-sparse
(the ``(i - j) mod l`` half of ``strided``) are computed on residue-grouped sequences and joined to
the blocked part in one softmax. Everything is plain autograd, so it trains on CPU, where
FlexAttention has no backward; ``flex_sparse_attention`` is the compiled kernel for CUDA.

This file is copied next to saved models and imported as remote code: it imports only torch and the
standard library.
"""

from __future__ import annotations

import dataclasses
import random
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

__all__ = [
    "BlockPattern",
    "LocalPattern",
    "SPARSE_PATTERNS",
    "SparsePattern",
    "StridedPattern",
    "flex_block_mask",
    "flex_sparse_attention",
    "make_sparse_pattern",
    "pattern_from_config",
    "sparse_pattern_class",
    "sparse_attention",
]

# The blocked kernel pays for gathers and per-block masks; dense SDPA with the boolean mask costs about
# 1.05-1.3x unmasked SDPA whatever the pattern. Measured on 2 CPU cores (fp32, H=8, D=64,
# window 128): blocked local breaks even with dense around L=512 and wins from 768 on, where it computes
# a quarter of the scores. So: dense when L <= DENSE_FALLBACK_MAX_LEN, or when the layout would still
# compute at least DENSE_FALLBACK_DENSITY of the L x L scores.
DENSE_FALLBACK_MAX_LEN = 512
DENSE_FALLBACK_DENSITY = 0.3
# A residue component (``strided``) needs explicit scores and softmax instead of one fused SDPA call:
# count its scores, and the band's it is joined with, this many times when comparing with the above.
EXPLICIT_SCORE_COST = 2.0
# Query block size bounds for the band patterns: small blocks waste less work at the window edges,
# large blocks give the matmuls enough rows to be efficient.
MIN_QUERY_BLOCK = 16
MAX_QUERY_BLOCK = 128
# Query rows per chunk when a layout is derived generically from ``allowed`` (bounds its memory).
_LAYOUT_CHUNK_ROWS = 1024
# Entries kept in the layout/table cache and the BlockMask cache.
_CACHE_SIZE = 64


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class LRUCache:
    """A small bounded cache of built layouts, tables and masks: ``cache(key, build)``.

    Bounded because long jobs see many lengths; keys hold patterns, which hash by value, so equal
    patterns share entries. Values are built outside inference mode and autograd, so a cache first
    filled under ``torch.inference_mode`` still serves training (autograd may save its tensors).
    ``functools.lru_cache`` does not fit: it cannot control how the value is built.
    """

    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self._entries: OrderedDict[Any, Any] = OrderedDict()

    def __call__(self, key: Any, build: Callable[[], Any]) -> Any:
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        with torch.inference_mode(False), torch.no_grad():
            value = build()
        self._entries[key] = value
        while len(self._entries) > self.maxsize:
            self._entries.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()


_cached = LRUCache(_CACHE_SIZE)


def _positions_length(pattern: SparsePattern, positions: torch.Tensor) -> int:
    """The sequence length that position ids span (picks length-dependent tables; one host sync)."""
    return int(pattern.pattern_index(positions).max().clamp(min=0)) + 1 if positions.numel() else 1


def _check_positive(name: str, value: Any, *, allow_zero: bool = False) -> None:
    """Local, not from validation_hf_attention: this file must also load on its own (torch and stdlib only)."""
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        kind = "a non-negative" if allow_zero else "a positive"
        raise ValueError(f"{name} must be {kind} integer, got {value!r}")


# --------------------------------------------------------------------------------------------------
# Patterns
# --------------------------------------------------------------------------------------------------

_PATTERN_REGISTRY: dict[str, type[SparsePattern]] = {}


@dataclasses.dataclass(frozen=True)
class SparsePattern:
    """Base class: a subclass defines ``allowed`` (and optionally layout hints) and registers by ``name``.

    Subclasses are frozen dataclasses: patterns hash by value, and equal patterns share cached layouts.
    Contract of ``allowed``: the diagonal is always allowed (no query row is ever empty), and with
    ``causal=True`` nothing above the diagonal is. ``allowed`` minus ``blocked_allowed`` must lie on
    the residue classes ``(i - j) % residue_stride == 0`` (or be empty when ``residue_stride`` is None).
    """

    name: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            _PATTERN_REGISTRY[cls.name] = cls

    #: The config fields this pattern reads, by option name (``from_config`` reads only these).
    config_options: ClassVar[dict[str, str]] = {}

    @classmethod
    def from_options(cls, **options: Any) -> SparsePattern:
        """Build from the full option set of ``make_sparse_pattern``, validating only what it uses."""
        raise NotImplementedError

    @classmethod
    def options_from_config(cls, config: Any) -> dict[str, Any]:
        return {option: getattr(config, field) for option, field in cls.config_options.items()}

    @classmethod
    def from_config(cls, config: Any) -> SparsePattern:
        """The 1-D pattern of a config (``sparse_*`` fields)."""
        return cls.from_options(**cls.options_from_config(config))

    @classmethod
    def grid_form(cls, config: Any, grid_height: int, grid_width: int, num_prefix_tokens: int) -> SparsePattern:
        """The 2-D form of this pattern on a patch grid (attention_sparse_2d.py)."""
        raise ValueError(f"sparse_pattern={cls.name!r} has no 2-D form for a patch grid.")

    # -- the element rule ------------------------------------------------------------------------
    def allowed(
        self, q_idx: torch.Tensor, kv_idx: torch.Tensor, causal: bool, *, seq_len: int | None = None
    ) -> torch.Tensor:
        """Bool, broadcasting ``q_idx`` and ``kv_idx``; ``seq_len`` only picks length-dependent tables."""
        raise NotImplementedError

    def blocked_allowed(
        self, q_idx: torch.Tensor, kv_idx: torch.Tensor, causal: bool, *, seq_len: int | None = None
    ) -> torch.Tensor:
        """The part of ``allowed`` the blocked kernel covers by gathering key blocks (default: all)."""
        return self.allowed(q_idx, kv_idx, causal, seq_len=seq_len)

    # -- positions ------------------------------------------------------------------------------
    #: ``allowed`` depends on ``q_idx - kv_idx`` only: slots then give the pattern of positions whenever
    #: the two differ by one constant per sequence (left padding), and the blocked kernel keeps its layout.
    shift_invariant: ClassVar[bool] = False

    def pattern_index(self, positions: torch.Tensor) -> torch.Tensor:
        """Position ids -> the sequence indices ``allowed`` is defined on (1-D patterns: the positions)."""
        return positions

    def position_mask_fn(self, causal: bool, seq_len: int, device: Any = None) -> Callable[..., torch.Tensor]:
        """``(q_pos, k_pos) -> bool`` on position ids, tables bound now (FlexAttention mask_mod body)."""
        allowed = self.mask_fn(causal, seq_len, device)
        return lambda q_pos, k_pos: allowed(self.pattern_index(q_pos), self.pattern_index(k_pos))

    def position_mask(self, q_positions: torch.Tensor, k_positions: torch.Tensor, causal: bool) -> torch.Tensor:
        """Bool [B', Lq, Lk] from position ids [B' or 1, L]: the pattern of the tokens, wherever their slots are.

        Padding therefore cannot move blocks or make pad tokens global; causality here is on positions
        (callers add their own slot causality).
        """
        q_positions, k_positions = q_positions.long(), k_positions.long()
        allowed = self.position_mask_fn(causal, _positions_length(self, k_positions), k_positions.device)
        return allowed(q_positions[:, :, None], k_positions[:, None, :])

    # -- hints for the blocked kernel -----------------------------------------------------------
    residue_stride: ClassVar[int | None] = None

    def dense_queries(self, seq_len: int) -> int:
        """Leading queries that attend (almost) everything; they are computed densely, not blocked."""
        return 0

    def query_block_size(self, seq_len: int, causal: bool) -> int:
        return 64

    def key_blocks(self, num_blocks: int, block_size: int, causal: bool, seq_len: int) -> torch.Tensor:
        """Candidate key blocks per query block, LongTensor [num_blocks, K] (duplicates/out-of-range ok).

        The default derives them from ``blocked_allowed`` in row chunks; subclasses with a closed
        form override it so the first call at a new length stays cheap.
        """
        padded = num_blocks * block_size
        kv = torch.arange(padded)
        skip = self.dense_queries(seq_len)
        rows = max(1, _LAYOUT_CHUNK_ROWS // block_size) * block_size
        hits = []
        for start in range(0, padded, rows):
            q = torch.arange(start, min(start + rows, padded))
            ok = self.blocked_allowed(q[:, None], kv[None, :], causal, seq_len=seq_len) & (q[:, None] >= skip)
            ok = ok | (q[:, None] == kv[None, :])
            hits.append(ok.view(-1, block_size, num_blocks, block_size).any(3).any(1))
        hit = torch.cat(hits)
        width = int(hit.sum(1).max())
        order = torch.argsort((~hit).to(torch.int8), dim=1, stable=True)[:, :width]
        return torch.where(hit.gather(1, order), order, -1)

    def mask_fn(self, causal: bool, seq_len: int, device: Any = None) -> Callable[..., torch.Tensor]:
        """``(q_idx, kv_idx) -> bool`` with any tables bound now, traceable inside a compiled mask_mod."""
        return lambda q_idx, kv_idx: self.allowed(q_idx, kv_idx, causal, seq_len=seq_len)

    # -- public helpers --------------------------------------------------------------------------
    def dense_mask(
        self, q_len: int, kv_len: int, *, q_offset: int = 0, causal: bool = False, device: Any = None
    ) -> torch.Tensor:
        """Bool [q_len, kv_len], True = attend; ``q_offset`` is the first query's index (cached decoding)."""
        q = torch.arange(q_offset, q_offset + q_len, device=device)
        kv = torch.arange(kv_len, device=device)
        return self.allowed(q[:, None], kv[None, :], causal, seq_len=max(kv_len, q_offset + q_len))


@dataclasses.dataclass(frozen=True)
class LocalPattern(SparsePattern):
    """Sliding window: bidirectional ``|i - j| <= w // 2``; causal ``0 <= i - j < w``."""

    name: ClassVar[str] = "local"
    shift_invariant: ClassVar[bool] = True
    window_size: int = 128

    def __post_init__(self) -> None:
        _check_positive("window_size", self.window_size)

    config_options: ClassVar[dict[str, str]] = {"window_size": "sparse_window_size"}

    @classmethod
    def from_options(cls, **options: Any) -> LocalPattern:
        return cls(window_size=options["window_size"])

    @classmethod
    def grid_form(cls, config, grid_height, grid_width, num_prefix_tokens):
        from .attention_sparse_2d import GridLocalPattern

        return GridLocalPattern(grid_height=grid_height, grid_width=grid_width, num_prefix_tokens=num_prefix_tokens,
                                **cls.options_from_config(config))

    def _reach(self, causal: bool) -> tuple[int, int]:
        """How far back and forward a query looks."""
        return (self.window_size - 1, 0) if causal else (self.window_size // 2, self.window_size // 2)

    def allowed(self, q_idx, kv_idx, causal, *, seq_len=None):
        d = q_idx - kv_idx
        if causal:
            return (d >= 0) & (d < self.window_size)
        return d.abs() <= self.window_size // 2

    def query_block_size(self, seq_len: int, causal: bool) -> int:
        return _band_block_size(*self._reach(causal))

    def key_blocks(self, num_blocks, block_size, causal, seq_len):
        return _band_key_blocks(num_blocks, block_size, *self._reach(causal))


@dataclasses.dataclass(frozen=True)
class StridedPattern(SparsePattern):
    """Child et al. (2019) strided: ``|i - j| < l`` or ``(i - j) % l == 0``; causal adds ``j <= i``.

    The band is block-sparse; the periodic part is handled as a residue component (``residue_stride``).
    """

    name: ClassVar[str] = "strided"
    shift_invariant: ClassVar[bool] = True
    stride: int = 64

    def __post_init__(self) -> None:
        _check_positive("stride", self.stride)

    config_options: ClassVar[dict[str, str]] = {"stride": "sparse_stride"}

    @classmethod
    def from_options(cls, **options: Any) -> StridedPattern:
        return cls(stride=options["stride"])

    @classmethod
    def grid_form(cls, config, grid_height, grid_width, num_prefix_tokens):
        from .attention_sparse_2d import GridStridedPattern

        return GridStridedPattern(grid_height=grid_height, grid_width=grid_width, num_prefix_tokens=num_prefix_tokens,
                                  **cls.options_from_config(config))

    @property
    def residue_stride(self) -> int:  # type: ignore[override]
        return self.stride

    def _reach(self, causal: bool) -> tuple[int, int]:
        return (self.stride - 1, 0) if causal else (self.stride - 1, self.stride - 1)

    def allowed(self, q_idx, kv_idx, causal, *, seq_len=None):
        d = q_idx - kv_idx
        out = (d.abs() < self.stride) | (torch.remainder(d, self.stride) == 0)
        return out & (d >= 0) if causal else out

    def blocked_allowed(self, q_idx, kv_idx, causal, *, seq_len=None):
        d = q_idx - kv_idx
        out = d.abs() < self.stride
        return out & (d >= 0) if causal else out

    def query_block_size(self, seq_len: int, causal: bool) -> int:
        return _band_block_size(*self._reach(causal))

    def key_blocks(self, num_blocks, block_size, causal, seq_len):
        return _band_key_blocks(num_blocks, block_size, *self._reach(causal))


@dataclasses.dataclass(frozen=True)
class BlockPattern(SparsePattern):
    """BigBird-style: neighbouring blocks, ``g`` global tokens both ways, ``r`` random key blocks.

    The random key blocks of query block ``qb`` are drawn from ``random.Random(f"{seed}:{qb}")`` over
    ``range(capacity)`` with ``capacity = max(ceil(max_positions / b), blocks in the sequence)``: they
    depend on neither the batch nor the padded length, so padding and reloading give identical
    outputs. Blocks already covered (the neighbours, blocks made only of global tokens) are not drawn;
    a drawn block past the sequence end covers nothing. Indices are positions (``position_mask``, the
    kernels' ``pattern_positions``): the global tokens are positions ``0 .. g - 1``, never padding.
    (Past ``max_positions`` the capacity, hence the draws, follow the longest sequence of the batch.)
    """

    name: ClassVar[str] = "block"
    block_size: int = 64
    num_global_tokens: int = 0
    num_random_blocks: int = 0
    seed: int = 0
    max_positions: int = 4096

    def __post_init__(self) -> None:
        _check_positive("block_size", self.block_size)
        _check_positive("num_global_tokens", self.num_global_tokens, allow_zero=True)
        _check_positive("num_random_blocks", self.num_random_blocks, allow_zero=True)
        _check_positive("max_positions", self.max_positions)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")

    config_options: ClassVar[dict[str, str]] = {
        "block_size": "sparse_block_size", "num_global_tokens": "sparse_num_global_tokens",
        "num_random_blocks": "sparse_num_random_blocks", "seed": "sparse_seed",
        "max_positions": "max_position_embeddings",
    }

    @classmethod
    def from_options(cls, **options: Any) -> BlockPattern:
        return cls(
            block_size=options["block_size"],
            num_global_tokens=options["num_global_tokens"],
            num_random_blocks=options["num_random_blocks"],
            seed=options["seed"],
            max_positions=options["max_positions"],
        )

    @classmethod
    def grid_form(cls, config, grid_height, grid_width, num_prefix_tokens):
        from .attention_sparse_2d import GridBlockPattern

        options = cls.options_from_config(config)
        options.pop("max_positions")  # a grid's random tiles are drawn over the grid itself
        return GridBlockPattern(grid_height=grid_height, grid_width=grid_width, num_prefix_tokens=num_prefix_tokens,
                                **options)

    def capacity(self, seq_len: int | None = None) -> int:
        """Number of key blocks random draws come from; only grows past ``max_positions``."""
        blocks = _ceil_div(self.max_positions, self.block_size)
        return max(blocks, _ceil_div(seq_len, self.block_size)) if seq_len else blocks

    def random_blocks(self, seq_len: int | None = None, device: Any = None) -> torch.Tensor:
        """LongTensor [capacity, r]: the random key blocks of every query block (cached per device)."""
        cap = self.capacity(seq_len)
        key = (self, "random", cap, str(torch.device(device) if device is not None else "cpu"))
        return _cached(key, lambda: self._draw_random_blocks(cap, device))

    def _draw_random_blocks(self, cap: int, device: Any) -> torch.Tensor:
        r = self.num_random_blocks
        lo = self.num_global_tokens // self.block_size  # blocks made only of global tokens: covered
        rows = []
        for qb in range(cap):
            rng = random.Random(f"{self.seed}:{qb}")
            taken = sum(lo <= kb < cap for kb in (qb - 1, qb, qb + 1))
            if cap - lo - taken <= 4 * r:  # few candidates: sample from the explicit pool
                pool = [kb for kb in range(lo, cap) if abs(kb - qb) > 1]
                drawn = rng.sample(pool, min(r, len(pool)))
            else:  # many candidates: rejection sampling stays O(r) per block for huge capacities
                drawn = []
                while len(drawn) < r:
                    kb = rng.randrange(cap)
                    if kb >= lo and abs(kb - qb) > 1 and kb not in drawn:
                        drawn.append(kb)
            rows.append(drawn + [qb] * (r - len(drawn)))  # pad with the own block: already allowed
        return torch.tensor(rows, dtype=torch.long, device=device).view(cap, r)

    def mask_fn(self, causal: bool, seq_len: int, device: Any = None) -> Callable[..., torch.Tensor]:
        table = self.random_blocks(seq_len, device) if self.num_random_blocks else None
        return lambda q_idx, kv_idx: self._allowed(q_idx, kv_idx, causal, table)

    def allowed(self, q_idx, kv_idx, causal, *, seq_len=None):
        table = self.random_blocks(seq_len, q_idx.device) if self.num_random_blocks else None
        return self._allowed(q_idx, kv_idx, causal, table)

    def _allowed(self, q_idx, kv_idx, causal: bool, table: torch.Tensor | None) -> torch.Tensor:
        b, g = self.block_size, self.num_global_tokens
        qb, kb = q_idx // b, kv_idx // b
        out = ((qb - kb).abs() <= 1) | ((q_idx >= 0) & (q_idx < g)) | ((kv_idx >= 0) & (kv_idx < g))
        if table is not None:
            row = qb.clamp(0, table.shape[0] - 1)  # negative positions (padding before a cache) read no row
            hit = table[row, 0] == kb
            for t in range(1, self.num_random_blocks):
                hit = hit | (table[row, t] == kb)
            out = out | (hit & (qb >= 0) & (qb < table.shape[0]))
        return out & (kv_idx <= q_idx) if causal else out

    def dense_queries(self, seq_len: int) -> int:
        return min(self.num_global_tokens, seq_len)

    def query_block_size(self, seq_len: int, causal: bool) -> int:
        return self.block_size

    def key_blocks(self, num_blocks, block_size, causal, seq_len):
        qb = torch.arange(num_blocks)[:, None]
        parts = [qb + torch.arange(-1, 2)]
        n_global = _ceil_div(self.num_global_tokens, block_size)
        if n_global:
            parts.append(torch.arange(n_global).expand(num_blocks, n_global))
        if self.num_random_blocks:
            parts.append(self.random_blocks(seq_len)[:num_blocks])
        out = torch.cat(parts, 1)
        return out.masked_fill(out > qb, -1) if causal else out


SPARSE_PATTERNS: tuple[str, ...] = tuple(_PATTERN_REGISTRY)
SPARSE_PATTERN_CLASSES = _PATTERN_REGISTRY  # name -> class, the registry every other module reads


def sparse_pattern_class(name: str) -> type[SparsePattern]:
    if name not in _PATTERN_REGISTRY:
        raise ValueError(
            f"sparse_pattern={name!r} is not valid; choose None (dense) or one of "
            f"{', '.join(map(repr, _PATTERN_REGISTRY))}."
        )
    return _PATTERN_REGISTRY[name]


def pattern_from_config(config: Any, grid: tuple[int, int, int] | None = None) -> SparsePattern | None:
    """The one factory: `config.sparse_pattern` as a 1-D pattern, or on a (height, width, prefix) patch grid."""
    if config.sparse_pattern is None:
        return None
    cls = sparse_pattern_class(config.sparse_pattern)
    return cls.from_config(config) if grid is None else cls.grid_form(config, *grid)


def make_sparse_pattern(
    pattern: str,
    *,
    window_size: int,
    block_size: int,
    stride: int,
    num_global_tokens: int,
    num_random_blocks: int,
    seed: int,
    max_positions: int,
) -> SparsePattern:
    """Build a pattern by name from config-style options; each pattern reads (and checks) only its own."""
    cls = _PATTERN_REGISTRY.get(pattern) if isinstance(pattern, str) else None
    if cls is None:
        choices = ", ".join(repr(name) for name in _PATTERN_REGISTRY)
        raise ValueError(f"Unknown sparse attention pattern {pattern!r}; valid choices: {choices}")
    return cls.from_options(
        window_size=window_size,
        block_size=block_size,
        stride=stride,
        num_global_tokens=num_global_tokens,
        num_random_blocks=num_random_blocks,
        seed=seed,
        max_positions=max_positions,
    )


def _band_block_size(before: int, after: int) -> int:
    """About half the band span, a multiple of 16: 3 key blocks of which 2/3 are in the band.

    For window 128 on 2 CPU cores, query blocks of 64 beat 32 and 128 (fwd+bwd at L=4096).
    """
    span = before + after + 1
    size = 16 * max(1, round(span / 32))
    return max(MIN_QUERY_BLOCK, min(MAX_QUERY_BLOCK, size))


def _band_key_blocks(num_blocks: int, block_size: int, before: int, after: int) -> torch.Tensor:
    lo, hi = _ceil_div(before, block_size), _ceil_div(after, block_size)
    return torch.arange(num_blocks)[:, None] + torch.arange(-lo, hi + 1)


# --------------------------------------------------------------------------------------------------
# Layout: everything the blocked kernel needs for one (pattern, length, causal, device), cached
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Residue:
    stride: int
    groups: int  # G = ceil(L / stride); group c holds positions c, c + stride, ...
    pos: torch.Tensor  # [stride, G] positions, clamped into [0, L) (past-the-end entries are masked)
    mask: torch.Tensor  # [stride, G, G] bool: allowed and not already in the blocked part


@dataclasses.dataclass
class _Layout:
    seq_len: int
    block_size: int
    num_blocks: int
    band_offset: int | None  # key blocks of block qb are qb - band_offset + arange(K): unfold, no gather
    kv_blocks: torch.Tensor  # [nQB, K] clamped key block indices
    kv_pos: torch.Tensor  # [nQB, K * bs] key positions, clamped into [0, L) (the others are masked)
    mask: torch.Tensor  # [nQB, bs, K * bs] exact element mask, no padding
    diag: torch.Tensor  # [nQB, bs, K * bs] query == key
    dense_queries: int
    residue: _Residue | None
    density: float  # computed scores / L^2, explicit ones weighted by EXPLICIT_SCORE_COST

    @property
    def num_keys(self) -> int:
        return self.kv_pos.shape[1]


def _build_layout(pattern: SparsePattern, seq_len: int, causal: bool, device: torch.device) -> _Layout:
    bs = max(1, min(pattern.query_block_size(seq_len, causal), seq_len))
    nb = _ceil_div(seq_len, bs)
    raw = pattern.key_blocks(nb, bs, causal, seq_len).to(torch.long).cpu()
    width, band = raw.shape[1], int(raw[0, 0])
    expected = torch.arange(nb)[:, None] + torch.arange(band, band + width)
    band_offset = -band if band <= 0 and torch.equal(raw, expected) else None
    if band_offset is not None:
        valid = (expected >= 0) & (expected < nb)
        blocks = expected
    else:
        cand, _ = torch.sort(torch.where((raw >= 0) & (raw < nb), raw, -1), dim=1)
        valid = cand >= 0
        valid[:, 1:] &= cand[:, 1:] != cand[:, :-1]
        blocks = cand
    # drop key-block columns that are invalid in every row (e.g. -1 padding of the candidates)
    keep = valid.any(0)
    if band_offset is None and not bool(keep.all()):
        valid, blocks = valid[:, keep], blocks[:, keep]
    k = blocks.shape[1]
    kv_pos = (blocks[:, :, None] * bs + torch.arange(bs)).view(nb, k * bs)
    kv_valid = valid[:, :, None].expand(nb, k, bs).reshape(nb, 1, k * bs)
    q_pos = torch.arange(nb * bs).view(nb, bs, 1)
    kv = kv_pos[:, None, :]
    diag = q_pos == kv
    mask = pattern.blocked_allowed(q_pos, kv, causal, seq_len=seq_len) & kv_valid & ((kv < seq_len) | diag)

    residue = None
    stride = pattern.residue_stride
    if stride is not None:
        groups = _ceil_div(seq_len, stride)
        pos = torch.arange(groups * stride).view(groups, stride).t()  # [stride, G]
        qi, ki = pos[:, :, None], pos[:, None, :]
        rmask = pattern.allowed(qi, ki, causal, seq_len=seq_len)
        rmask &= ~pattern.blocked_allowed(qi, ki, causal, seq_len=seq_len) & (ki < seq_len)
        if bool(rmask.any()):
            residue = _Residue(stride, groups, pos.clamp(max=seq_len - 1).to(device), rmask.to(device))
    computed = nb * bs * k * bs
    if residue is not None:
        computed = (computed + residue.stride * residue.groups**2) * EXPLICIT_SCORE_COST
    dense_rows = pattern.dense_queries(seq_len)
    computed += dense_rows * seq_len
    return _Layout(
        seq_len=seq_len,
        block_size=bs,
        num_blocks=nb,
        band_offset=band_offset,
        kv_blocks=blocks.clamp(0, nb - 1).to(device),
        kv_pos=kv_pos.clamp(0, seq_len - 1).to(device),
        mask=mask.to(device),
        diag=diag.to(device),
        dense_queries=dense_rows,
        residue=residue,
        density=computed / float(seq_len * seq_len),
    )


def _layout(pattern: SparsePattern, seq_len: int, causal: bool, device: torch.device) -> _Layout:
    key = (pattern, "layout", seq_len, bool(causal), str(device))
    return _cached(key, lambda: _build_layout(pattern, seq_len, causal, device))


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


def _bias(
    score_bias: Callable[[torch.Tensor], torch.Tensor],
    positions: torch.Tensor | None,
    q_idx: torch.Tensor,
    kv_idx: torch.Tensor,
) -> torch.Tensor:
    """Bias [B' or 1, H, *S] for rel = k_pos - q_pos, S the broadcast shape of the sequence indices.

    Without ``positions`` the indices are the positions; with them the (clamped) indices are looked up.
    """
    if positions is None:
        return score_bias(kv_idx - q_idx).unsqueeze(0)
    return score_bias(positions[:, kv_idx] - positions[:, q_idx]).movedim(0, 1)


def _padding_rule(
    pad: torch.Tensor | None, allowed: torch.Tensor, diag: torch.Tensor, kv_idx: torch.Tensor
) -> torch.Tensor:
    """Exclude padding keys but keep each query's own key, so padding queries never get an empty row.

    A real query's own key is real, so this changes nothing for real tokens. ``kv_idx`` [..., 1, K].
    """
    if pad is None:
        return allowed
    return allowed & (pad[:, kv_idx] | diag)


def _cached_dense_mask(pattern: SparsePattern, rows: int, seq_len: int, causal: bool, device) -> torch.Tensor:
    key = (pattern, "dense", rows, seq_len, bool(causal), str(device))
    return _cached(key, lambda: pattern.dense_mask(rows, seq_len, causal=causal, device=device))


def _pad_seq(x: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """Zero-pad dim 1 (the sequence) of a [B, L, ...] tensor."""
    if before == 0 and after == 0:
        return x
    return F.pad(x, (0, 0) * (x.dim() - 2) + (before, after))


def _gather_blocks(x: torch.Tensor, layout: _Layout) -> torch.Tensor:
    """[B, L, H, D] -> [B * nQB, H, K * bs, D]: the key blocks each query block reads."""
    b, seq_len, h, d = x.shape
    bs, nb, k = layout.block_size, layout.num_blocks, layout.kv_blocks.shape[1]
    if layout.band_offset is not None:  # consecutive blocks: overlapping windows, no index tensor
        lead = layout.band_offset * bs
        windows = _pad_seq(x, lead, (k - 1) * bs + nb * bs - seq_len - lead).unfold(1, k * bs, bs)
        return windows.permute(0, 1, 4, 2, 3).reshape(b * nb, k * bs, h, d).transpose(1, 2)
    blocks = _pad_seq(x, 0, nb * bs - seq_len).reshape(b, nb, bs, h, d)
    # index_select: its backward (index_add) is about 2x faster on CPU than advanced indexing's
    gathered = blocks.index_select(1, layout.kv_blocks.view(-1))
    return gathered.reshape(b * nb, k * bs, h, d).transpose(1, 2)


def _fold(x: torch.Tensor, batch: int) -> torch.Tensor:
    """[1 or B, n, h, r, c] -> [B * n, h, r, c]: fold the block axis into SDPA's batch axis."""
    x = x.expand(batch, *x.shape[1:])
    return x.reshape(batch * x.shape[1], *x.shape[2:])


def _attn_mask(mask: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Bool mask, or the bias with -inf outside the mask (the bias then gets gradients)."""
    return mask if bias is None else bias.to(dtype).masked_fill(~mask, float("-inf"))


def _add_mask(scores: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
    if attn_mask.dtype == torch.bool:
        return scores.masked_fill(~attn_mask, float("-inf"))
    return scores + attn_mask.to(scores.dtype)


def _softmax(scores: torch.Tensor, dropout: float) -> torch.Tensor:
    low = scores.dtype in (torch.float16, torch.bfloat16)
    probs = scores.softmax(-1, dtype=torch.float32).to(scores.dtype) if low else scores.softmax(-1)
    return F.dropout(probs, dropout) if dropout > 0 else probs


def sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    pattern: SparsePattern,
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    score_bias: Callable[[torch.Tensor], torch.Tensor] | None = None,
    positions: torch.Tensor | None = None,
    scaling: float | None = None,
    dropout: float = 0.0,
    training: bool = False,
    pattern_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block-sparse attention over ``pattern``; q/k/v ``[B, H, L, D]`` -> out ``[B, L, H, D]``.

    Exactly dense softmax attention under ``pattern.dense_mask`` with padding keys excluded and
    ``score_bias(k_pos - q_pos)`` ([H, *S]) added, but computing only the gathered key blocks, so the
    cost is O(L * keys-per-query). Plain autograd: trains on any device, including CPU. Works on the
    [B, L, H, D] memory layout that transformers' projections produce, so the usual
    ``view(B, L, H, D).transpose(1, 2)`` inputs are read without an extra copy.

    ``pattern_positions`` ([B or 1, L] position ids) puts the pattern on the tokens' positions instead
    of their slots (``pattern.position_mask``, plus slot causality), so padding moves nothing. Where
    the real tokens' positions are their slots (or, for a shift-invariant pattern, slots plus one
    constant per row) the blocked layout is used unchanged; otherwise (e.g. a block pattern with left
    padding) the pattern is evaluated densely on the positions.
    """
    if query.dim() != 4 or key.shape[:3] != query.shape[:3] or value.shape[:3] != query.shape[:3]:
        raise ValueError(
            "sparse_attention expects query/key/value [B, H, L, D] with equal B, H, L, got "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    batch, _, seq_len, _ = query.shape
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    dropout = dropout if training else 0.0
    pad = None
    if key_padding_mask is not None:
        pad = key_padding_mask.to(device=query.device, dtype=torch.bool)
        if pad.shape != (batch, seq_len):
            raise ValueError(f"key_padding_mask must be [B, L] = {(batch, seq_len)}, got {tuple(pad.shape)}")
    if positions is not None:
        positions = positions.to(device=query.device, dtype=torch.long)
        if positions.dim() != 2 or positions.shape[1] != seq_len:
            raise ValueError(f"positions must be [B, L] or [1, L], L={seq_len}, got {tuple(positions.shape)}")

    if pattern_positions is not None:
        pattern_positions = pattern_positions.to(device=query.device, dtype=torch.long)
        if pattern_positions.dim() != 2 or pattern_positions.shape[1] != seq_len:
            raise ValueError(
                f"pattern_positions must be [B, L] or [1, L], L={seq_len}, got {tuple(pattern_positions.shape)}"
            )
        if not _slots_are_positions(pattern, pattern_positions, pad):
            out = _dense_attention(
                query, key, value, pattern, causal, pad, score_bias, positions, scaling, dropout,
                pattern_positions=pattern_positions,
            )
            return out.transpose(1, 2)

    layout = None if seq_len <= DENSE_FALLBACK_MAX_LEN else _layout(pattern, seq_len, causal, query.device)
    if layout is None or layout.density >= DENSE_FALLBACK_DENSITY:
        out = _dense_attention(query, key, value, pattern, causal, pad, score_bias, positions, scaling, dropout)
        return out.transpose(1, 2)

    out = _blocked_attention(query, key, value, layout, pad, score_bias, positions, scaling, dropout)
    if layout.dense_queries:  # e.g. global tokens: a few rows that attend everything
        rows = layout.dense_queries
        args = (pattern, causal, pad, score_bias, positions, scaling, dropout, rows)
        out = torch.cat([_dense_attention(query, key, value, *args).transpose(1, 2), out[:, rows:]], dim=1)
    return out


def _slots_are_positions(pattern: SparsePattern, pattern_positions: torch.Tensor, pad: torch.Tensor | None) -> bool:
    """Whether the slot pattern equals the position pattern on every real token (one host sync).

    True when the real tokens' pattern indices are their slots, or, for shift-invariant patterns, their
    slots plus one constant per sequence (one contiguous run of positions, as with left padding).
    """
    idx = pattern.pattern_index(pattern_positions)
    offset = idx - torch.arange(idx.shape[1], device=idx.device)
    real = torch.ones_like(offset, dtype=torch.bool) if pad is None else pad
    offset, real = torch.broadcast_tensors(offset, real)
    if pattern.shift_invariant:
        first = real.to(torch.int8).argmax(dim=1, keepdim=True)  # first real token of each row
        expected = offset.gather(1, first)
    else:
        expected = torch.zeros_like(offset[:, :1])
    return bool(((offset == expected) | ~real).all())


def _dense_attention(
    query, key, value, pattern: SparsePattern, causal, pad, score_bias, positions, scaling, dropout, rows=None,
    pattern_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense SDPA under the pattern's boolean mask (short sequences, global query rows); [B, H, rows, D].

    With ``pattern_positions`` the mask is the pattern of those positions (and slot causality).
    """
    seq_len = key.shape[2]
    rows = seq_len if rows is None else rows
    q_idx = torch.arange(rows, device=query.device)[:, None]
    kv_idx = torch.arange(seq_len, device=query.device)[None, :]
    if pattern_positions is None:
        mask = _cached_dense_mask(pattern, rows, seq_len, causal, query.device)
    else:
        mask = pattern.position_mask(pattern_positions[:, :rows], pattern_positions, causal)
        mask = mask & (kv_idx <= q_idx) if causal else mask
    mask = _padding_rule(pad, mask, q_idx == kv_idx, kv_idx).view(-1, 1, rows, seq_len)  # 4-D: else math SDPA
    bias = None if score_bias is None else _bias(score_bias, positions, q_idx, kv_idx)
    attn_mask = _attn_mask(mask, bias, query.dtype)
    return F.scaled_dot_product_attention(
        query[:, :, :rows], key, value, attn_mask=attn_mask, dropout_p=dropout, scale=scaling
    )


def _blocked_attention(query, key, value, layout: _Layout, pad, score_bias, positions, scaling, dropout):
    """Query blocks against their gathered key blocks (+ the residue component); out [B, L, H, D].

    Blocks are folded into SDPA's batch axis ([B * nQB, H, bs, D]), so the per-block mask
    [nQB, 1, bs, K * bs] broadcasts over heads without being copied per head.
    """
    batch, heads, seq_len, dim = query.shape
    bs, nb, nk = layout.block_size, layout.num_blocks, layout.num_keys
    padded = nb * bs
    q_seq, k_seq, v_seq = (x.transpose(1, 2) for x in (query, key, value))  # [B, L, H, D]
    q_blocks = _pad_seq(q_seq, 0, padded - seq_len).reshape(batch * nb, bs, heads, dim).transpose(1, 2)
    k_blocks, v_blocks = _gather_blocks(k_seq, layout), _gather_blocks(v_seq, layout)
    mask = _padding_rule(pad, layout.mask, layout.diag, layout.kv_pos[:, None, :])
    mask = mask.view(-1, nb, 1, bs, nk)  # [B or 1, nQB, 1 (heads), bs, K * bs]
    bias = None
    if score_bias is not None:  # indices past the end are clamped: those entries are masked or dropped
        q_idx = torch.arange(padded, device=query.device).clamp(max=seq_len - 1).view(nb, bs, 1)
        bias = _bias(score_bias, positions, q_idx, layout.kv_pos[:, None, :]).transpose(1, 2)
    attn_mask = _fold(_attn_mask(mask, bias, query.dtype), batch)

    if layout.residue is None:
        out = F.scaled_dot_product_attention(
            q_blocks, k_blocks, v_blocks, attn_mask=attn_mask, dropout_p=dropout, scale=scaling
        )
        return out.transpose(1, 2).reshape(batch, padded, heads, -1)[:, :seq_len]

    # One softmax over [band keys | residue keys] per query: scores concatenated in [B, L, H, keys].
    s_band = _add_mask((q_blocks * scaling) @ k_blocks.transpose(-1, -2), attn_mask)  # scale q, not scores
    s_band = s_band.transpose(1, 2).reshape(batch, padded, heads, nk)[:, :seq_len]
    res = _Grouped(layout.residue, q_seq, k_seq, v_seq, pad, score_bias, positions, scaling)
    probs = _softmax(torch.cat([s_band, res.scores], dim=-1), dropout)
    p_band, p_res = probs.split([nk, res.groups], dim=-1)
    p_band = _pad_seq(p_band, 0, padded - seq_len).reshape(batch * nb, bs, heads, nk).transpose(1, 2)
    out = (p_band @ v_blocks).transpose(1, 2).reshape(batch, padded, heads, -1)[:, :seq_len]
    return out + res.output(p_res)


class _Grouped:
    """Residue component: position i = g * stride + c is row g of group c; groups attend within themselves.

    ``scores`` are [B, L, H, G] in sequence order (to join the band's in one softmax); ``output`` maps
    the matching probabilities back to [B, L, H, D].
    """

    def __init__(self, res: _Residue, q_seq, k_seq, v_seq, pad, score_bias, positions, scaling):
        self.res, self.groups = res, res.groups
        self.batch, self.seq_len, self.heads, _ = q_seq.shape
        mask = res.mask if pad is None else res.mask & pad[:, res.pos[:, None, :]]
        mask = mask.view(-1, res.stride, 1, res.groups, res.groups)  # [B or 1, stride, 1, G, G]
        bias = None
        if score_bias is not None:
            pos = res.pos
            bias = _bias(score_bias, positions, pos[:, :, None], pos[:, None, :]).transpose(1, 2)
        attn_mask = _fold(_attn_mask(mask, bias, q_seq.dtype), self.batch)
        self.v = self._group(v_seq)
        scores = _add_mask(self._group(q_seq * scaling) @ self._group(k_seq).transpose(-1, -2), attn_mask)
        self.scores = self._ungroup(scores)

    def _group(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, H, X] -> [B * stride, H, G, X]
        stride, groups = self.res.stride, self.groups
        x = _pad_seq(x, 0, groups * stride - self.seq_len).reshape(self.batch, groups, stride, self.heads, -1)
        return x.permute(0, 2, 3, 1, 4).reshape(self.batch * stride, self.heads, groups, -1)

    def _ungroup(self, x: torch.Tensor) -> torch.Tensor:  # [B * stride, H, G, X] -> [B, L, H, X]
        x = x.reshape(self.batch, self.res.stride, self.heads, self.groups, -1).permute(0, 3, 1, 2, 4)
        return x.reshape(self.batch, self.groups * self.res.stride, self.heads, -1)[:, : self.seq_len]

    def output(self, probs: torch.Tensor) -> torch.Tensor:
        return self._ungroup(self._group(probs) @ self.v)


# --------------------------------------------------------------------------------------------------
# FlexAttention
# --------------------------------------------------------------------------------------------------

_COMPILED_FLEX: Callable[..., torch.Tensor] | None = None


def _flex_kernel() -> Callable[..., torch.Tensor]:
    """flex_attention compiled once per process (uncompiled, flex_attention is a slow dense reference).

    Default (automatic dynamic) shapes: a new sequence length recompiles once, then shapes go dynamic,
    instead of one recompilation per length until the recompile limit drops to the eager path. Inside
    an outer ``torch.compile`` the plain function is traced by that compile instead.
    """
    from torch.nn.attention.flex_attention import flex_attention

    if torch.compiler.is_compiling():
        return flex_attention
    global _COMPILED_FLEX
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention)
    return _COMPILED_FLEX


def flex_block_mask(
    pattern: SparsePattern,
    seq_len: int,
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    device: Any = None,
    pattern_positions: torch.Tensor | None = None,
):
    """BlockMask for ``pattern`` (+ padding, keeping each query's own key); cached without padding.

    ``pattern_positions`` ([B or 1, L]) puts the pattern on positions as in ``sparse_attention``; the
    slot mask (cached) is kept where it is the same.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    device = torch.device(device) if device is not None else torch.device("cpu")
    # On CUDA, compiling the mask evaluation avoids materialising L x L booleans at long lengths.
    compile_mask = device.type == "cuda"

    def build(mod, batch):
        return create_block_mask(mod, batch, None, seq_len, seq_len, device, _compile=compile_mask)

    pad = None if key_padding_mask is None else key_padding_mask.to(device=device, dtype=torch.bool)
    if pattern_positions is not None:
        pattern_positions = pattern_positions.to(device=device, dtype=torch.long)
        if not _slots_are_positions(pattern, pattern_positions, pad):
            return _flex_position_block_mask(pattern, pattern_positions, causal, pad, build)

    allowed = pattern.mask_fn(causal, seq_len, device)  # tables bound here, outside the traced mask_mod

    def mask_mod(b, h, q_idx, kv_idx):
        return allowed(q_idx, kv_idx)

    if pad is None:
        return _cached((pattern, "flex", seq_len, bool(causal), str(device)), lambda: build(mask_mod, None))

    def padded_mask_mod(b, h, q_idx, kv_idx):
        return allowed(q_idx, kv_idx) & (pad[b, kv_idx] | (q_idx == kv_idx))

    return build(padded_mask_mod, pad.shape[0])


def _flex_position_block_mask(pattern: SparsePattern, pattern_positions, causal: bool, pad, build):
    """BlockMask of the pattern evaluated on each row's positions (+ slot causality and padding)."""
    batch = max(pattern_positions.shape[0], pad.shape[0] if pad is not None else 1)
    pos = pattern_positions.expand(batch, -1)
    allowed = pattern.position_mask_fn(causal, _positions_length(pattern, pos), pos.device)

    def mask_mod(b, h, q_idx, kv_idx):
        ok = allowed(pos[b, q_idx], pos[b, kv_idx])
        if causal:
            ok = ok & (kv_idx <= q_idx)
        if pad is not None:
            ok = ok & (pad[b, kv_idx] | (q_idx == kv_idx))
        return ok

    return build(mask_mod, batch)


def flex_sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    pattern: SparsePattern,
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    score_bias: Callable[[torch.Tensor], torch.Tensor] | None = None,
    scaling: float | None = None,
    pattern_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Compiled FlexAttention with the pattern's BlockMask (on ``pattern_positions`` if given); out ``[B, L, H, D]``.

    The sparse training kernel on CUDA; on CPU (torch 2.13) forward only, FlexAttention has no CPU
    backward. ``score_bias(k_pos - q_pos)`` ([H, *S]) becomes a ``score_mod`` computed from the indices (on
    ``pattern_positions`` when given), so no [B, H, L, L] bias is built.
    Each (pattern, causal, padded or not, score_mod) combination compiles its own graph; dynamo's
    ``recompile_limit`` (8 per process for flex_attention) bounds how many one process can mix.
    """
    block_mask = flex_block_mask(
        pattern, query.shape[2], causal=causal, key_padding_mask=key_padding_mask, device=query.device,
        pattern_positions=pattern_positions,
    )
    score_mod = None
    if score_bias is not None:
        positions = pattern_positions
        if positions is None:
            positions = torch.arange(query.shape[2], device=query.device)[None]

        def score_mod(score, b, h, q_idx, kv_idx):
            row = positions[b if positions.shape[0] > 1 else 0]
            return score + score_bias(row[kv_idx] - row[q_idx])[h].to(score.dtype)

    out = _flex_kernel()(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scaling)
    return out.transpose(1, 2)
