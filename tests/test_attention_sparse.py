"""Sparse attention patterns and kernels: exact against dense masked softmax, and really sparse.

The module is loaded from its file, as ``trust_remote_code`` loads it next to a saved model: this also
checks that it imports only torch and the standard library.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import sys
import warnings
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "hf_attention" / "attention_sparse.py"
_SPEC = importlib.util.spec_from_file_location("standalone_attention_sparse", _PATH)
sp = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = sp
_SPEC.loader.exec_module(sp)

F64 = torch.float64
OPTIONS = dict(
    window_size=8, block_size=8, stride=6, num_global_tokens=3, num_random_blocks=2, seed=1, max_positions=128
)


def make(name: str, **overrides) -> sp.SparsePattern:
    return sp.make_sparse_pattern(name, **{**OPTIONS, **overrides})


PATTERNS = {
    "local": make("local"),
    "local-odd": make("local", window_size=11),
    "strided": make("strided"),
    "strided-wide": make("strided", stride=20),
    "block": make("block"),
    "block-no-random": make("block", num_global_tokens=0, num_random_blocks=0, block_size=16),
}


# --------------------------------------------------------------------------------------------------
# Brute-force definitions (plain Python over (i, j), independent of the module's tensor code)
# --------------------------------------------------------------------------------------------------


def brute_allowed(pattern: sp.SparsePattern, i: int, j: int, causal: bool, seq_len: int) -> bool:
    if isinstance(pattern, sp.LocalPattern):
        w = pattern.window_size
        return 0 <= i - j < w if causal else abs(i - j) <= w // 2
    if isinstance(pattern, sp.StridedPattern):
        s = pattern.stride
        ok = abs(i - j) < s or (i - j) % s == 0
    else:
        b, g = pattern.block_size, pattern.num_global_tokens
        drawn = set(pattern.random_blocks(seq_len)[i // b].tolist()) if pattern.num_random_blocks else set()
        ok = abs(i // b - j // b) <= 1 or i < g or j < g or j // b in drawn
    return ok and (j <= i or not causal)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("name", list(PATTERNS))
def test_dense_mask_matches_definition(name, causal):
    pattern = PATTERNS[name]
    seq_len = 45
    mask = pattern.dense_mask(seq_len, seq_len, causal=causal)
    expected = [
        [brute_allowed(pattern, i, j, causal, seq_len) for j in range(seq_len)] for i in range(seq_len)
    ]
    assert mask.dtype == torch.bool and mask.shape == (seq_len, seq_len)
    assert mask.tolist() == expected
    assert bool(mask.diagonal().all())
    # decoding with a cache: rows q_offset.. of the full mask
    rows = pattern.dense_mask(7, seq_len, q_offset=30, causal=causal)
    assert torch.equal(rows, mask[30:37])


def test_block_random_blocks_properties():
    pattern = make("block", num_global_tokens=0, max_positions=100)  # capacity ceil(100 / 8) = 13
    table = pattern.random_blocks(40)
    assert table.shape == (13, 2)
    for qb, row in enumerate(table.tolist()):
        assert len(set(row)) == 2 and all(0 <= kb < 13 and abs(kb - qb) > 1 for kb in row)
    # past max_positions the capacity grows with the sequence
    assert pattern.random_blocks(200).shape == (25, 2)


def test_random_blocks_deterministic_per_seed_and_length_free():
    a, b, other = make("block", seed=3), make("block", seed=3), make("block", seed=4)
    assert torch.equal(a.random_blocks(), b.random_blocks())
    assert not torch.equal(a.random_blocks(), other.random_blocks())
    assert torch.equal(a.random_blocks(40), a.random_blocks(100))  # independent of the length
    assert torch.equal(a.dense_mask(100, 100)[:40, :40], a.dense_mask(40, 40))
    assert not torch.equal(a.dense_mask(100, 100), other.dense_mask(100, 100))
    assert a == b and hash(a) == hash(b) and a != other


def test_pattern_registry_and_errors():
    assert sp.SPARSE_PATTERNS == ("local", "strided", "block")
    with pytest.raises(ValueError, match=r"'dilated'.*'local', 'strided', 'block'"):
        make("dilated")
    for field, bad, name in [
        ("window_size", 0, "local"),
        ("stride", -2, "strided"),
        ("block_size", 0, "block"),
        ("num_random_blocks", -1, "block"),
        ("num_global_tokens", -1, "block"),
        ("max_positions", 0, "block"),
    ]:
        with pytest.raises(ValueError, match=rf"{field} must be .*, got {bad}"):
            make(name, **{field: bad})
    make("local", block_size=0)  # options of other patterns are not this pattern's business


# --------------------------------------------------------------------------------------------------
# Kernel == dense masked softmax, forward and gradients
# --------------------------------------------------------------------------------------------------


def reference(q, k, v, pattern, causal, pad, bias_fn, positions, scaling=None):
    """Dense softmax attention under ``pattern.dense_mask``, padding keys out (own key kept), bias added."""
    _, _, seq_len, dim = q.shape
    mask = pattern.dense_mask(seq_len, seq_len, causal=causal)[None]
    if pad is not None:
        mask = mask & (pad[:, None, :] | torch.eye(seq_len, dtype=torch.bool))
    scores = q @ k.transpose(-1, -2) * (dim**-0.5 if scaling is None else scaling)
    if bias_fn is not None:
        pos = torch.arange(seq_len)[None] if positions is None else positions
        scores = scores + bias_fn(pos[:, None, :] - pos[:, :, None]).movedim(0, 1)
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


@pytest.fixture
def force_blocked(monkeypatch):
    """Small test sizes would take the dense fallback: force the blocked kernel."""
    monkeypatch.setattr(sp, "DENSE_FALLBACK_MAX_LEN", 0)
    monkeypatch.setattr(sp, "DENSE_FALLBACK_DENSITY", float("inf"))


def alibi_like(heads: int, learnable: bool = False):
    slopes = torch.tensor([0.5**h for h in range(1, heads + 1)], dtype=F64, requires_grad=learnable)

    def bias_fn(rel: torch.Tensor) -> torch.Tensor:
        return -slopes.view(-1, *[1] * rel.dim()) * rel.abs()

    return bias_fn, slopes


def make_qkv(batch, heads, seq_len, dim, seq_major=False):
    """``seq_major``: [B, L, H, D] memory viewed as [B, H, L, D], as transformers' projections give it."""
    if seq_major:
        shape = (batch, seq_len, heads, dim)
        return [torch.randn(shape, dtype=F64).transpose(1, 2).requires_grad_() for _ in "qkv"]
    return [torch.randn(batch, heads, seq_len, dim, dtype=F64, requires_grad=True) for _ in "qkv"]


def relative_bias(heads: int, max_rel: int = 6):
    """T5-like learned bias over clipped relative positions: asymmetric, so a sign slip shows."""
    table = torch.randn(heads, 2 * max_rel + 1, dtype=F64, requires_grad=True)

    def bias_fn(rel: torch.Tensor) -> torch.Tensor:
        return table[:, rel.clamp(-max_rel, max_rel) + max_rel]

    return bias_fn, table


def run_case(
    pattern,
    seq_len,
    causal,
    with_pad,
    with_bias,
    batch=2,
    heads=2,
    dim=8,
    scaling=None,
    seq_major=False,
    positions=None,
):
    """``positions``: None (sequence indices), "batch" ([B, L], random gaps) or "shared" ([1, L])."""
    q, k, v = make_qkv(batch, heads, seq_len, dim, seq_major)
    pad = None
    if with_pad:
        pad = torch.ones(batch, seq_len, dtype=torch.bool)
        pad[0, seq_len - 13 :] = False  # right padding
        pad[1, :4] = False  # left padding
    if positions is not None:
        positions = torch.randint(1, 4, (batch if positions == "batch" else 1, seq_len)).cumsum(1)
    bias_fn, table = relative_bias(heads) if with_bias else (None, None)
    kwargs = dict(causal=causal, key_padding_mask=pad, score_bias=bias_fn, positions=positions, scaling=scaling)
    out = sp.sparse_attention(q, k, v, pattern, **kwargs)
    ref = reference(q, k, v, pattern, causal, pad, bias_fn, positions, scaling)
    assert out.shape == (batch, seq_len, heads, dim)
    assert torch.isfinite(out).all()
    real = torch.ones(batch, seq_len, 1, 1, dtype=F64) if pad is None else pad[:, :, None, None].to(F64)
    torch.testing.assert_close(out * real, ref * real)
    grad_out = torch.randn_like(out) * real  # padding queries may produce anything: no gradient from them
    leaves = [q, k, v] + ([table] if with_bias else [])
    got = torch.autograd.grad(out, leaves, grad_out)
    want = torch.autograd.grad(ref, leaves, grad_out)
    for name, a, b in zip(["q", "k", "v", "bias table"], got, want):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"grad {name}: {m}")


CASES = [(False, False), (True, False), (False, True), (True, True)]


@pytest.mark.parametrize("with_pad,with_bias", CASES, ids=["plain", "pad", "bias", "pad+bias"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("name", list(PATTERNS))
def test_sparse_matches_dense(force_blocked, name, causal, with_pad, with_bias):
    positions = "batch" if with_pad and with_bias else None
    run_case(PATTERNS[name], 45, causal, with_pad, with_bias, positions=positions)  # 45: no block multiple
    positions = "shared" if with_bias else None
    run_case(PATTERNS[name], 64, causal, with_pad, with_bias, seq_major=True, positions=positions)


@pytest.mark.parametrize("name", ["local", "strided", "block"])
def test_dense_fallback_matches_dense(name):
    """Default thresholds: short sequences go through one dense SDPA call, same semantics."""
    run_case(PATTERNS[name], 40, causal=False, with_pad=True, with_bias=True, scaling=0.3, positions="batch")


def test_default_path_at_moderate_length():
    """No monkeypatching: the real thresholds pick the blocked kernel and it is still exact."""
    pattern = make("local", window_size=16)
    layout = sp._layout(pattern, 600, True, torch.device("cpu"))
    assert layout.density < sp.DENSE_FALLBACK_DENSITY and 600 > sp.DENSE_FALLBACK_MAX_LEN
    run_case(pattern, 600, causal=True, with_pad=True, with_bias=True, heads=2, dim=4, positions="batch")


@dataclasses.dataclass(frozen=True)
class LookAhead(sp.SparsePattern):
    """A new pattern is one class with a rule: its key blocks come from the generic derivation."""

    def allowed(self, q_idx, kv_idx, causal, *, seq_len=None):
        out = ((q_idx - kv_idx).abs() <= 2) | (kv_idx // 8 == q_idx // 8 + 3)
        return out & (kv_idx <= q_idx) if causal else out

    def query_block_size(self, seq_len, causal):
        return 8


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_new_pattern_from_rule_only(force_blocked, causal):
    pattern = LookAhead()
    layout = sp._layout(pattern, 45, causal, torch.device("cpu"))
    assert layout.num_keys == (2 if causal else 4) * 8  # 2 or 4 of the 6 key blocks
    run_case(pattern, 45, causal, with_pad=True, with_bias=True, positions="batch")


@pytest.mark.parametrize("name", ["block", "strided", "local"])
def test_padding_invariance(force_blocked, name):
    """A padded batch gives each sequence the outputs it has alone (block: random blocks do not move)."""
    pattern = make(name, num_random_blocks=3, max_positions=96)
    heads, dim, lengths = 2, 8, (53, 90)
    seqs = [torch.randn(3, 1, heads, n, dim, dtype=F64) for n in lengths]
    total = max(lengths)
    batch = torch.zeros(3, len(lengths), heads, total, dim, dtype=F64)
    pad = torch.zeros(len(lengths), total, dtype=torch.bool)
    for b, (x, n) in enumerate(zip(seqs, lengths)):
        batch[:, b, :, :n] = x[:, 0]
        pad[b, :n] = True
    bias_fn, _ = alibi_like(heads)
    for causal in (False, True):
        out = sp.sparse_attention(*batch, pattern, causal=causal, key_padding_mask=pad, score_bias=bias_fn)
        for b, (x, n) in enumerate(zip(seqs, lengths)):
            alone = sp.sparse_attention(*x, pattern, causal=causal, score_bias=bias_fn)
            torch.testing.assert_close(out[b, :n], alone[0])


def test_blocked_kernel_skips_masked_work():
    """At L=4096 the layouts compute a small fraction of the L x L scores and never call dense SDPA."""
    seq_len = 4096
    patterns = {
        "local": (make("local", window_size=128), 0.06),
        "strided": (make("strided", stride=64), 0.13),  # its explicit scores count double
        "block": (
            make("block", block_size=64, num_global_tokens=64, num_random_blocks=3, max_positions=seq_len),
            0.15,
        ),
    }
    for _name, (pattern, limit) in patterns.items():
        for causal in (False, True):
            assert sp._layout(pattern, seq_len, causal, torch.device("cpu")).density < limit
    calls = []
    original = sp._dense_attention

    def spy(*args, **kwargs):
        calls.append(args[-1] if len(args) > 10 else kwargs.get("rows"))
        return original(*args, **kwargs)

    q = torch.randn(1, 1, seq_len, 8)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sp, "_dense_attention", spy)
        for pattern, _ in patterns.values():
            sp.sparse_attention(q, q, q, pattern)
    assert calls == [64]  # only the global query rows of the block pattern are computed densely


def test_cache_built_in_inference_mode_still_trains(force_blocked):
    pattern = make("block", max_positions=64)
    x = torch.randn(1, 2, 50, 8)
    with torch.inference_mode():
        sp.sparse_attention(x, x, x, pattern, causal=True)
    q = x.clone().requires_grad_()
    sp.sparse_attention(q, x, x, pattern, causal=True).sum().backward()
    assert torch.isfinite(q.grad).all()


def test_dropout_and_low_precision(force_blocked):
    pattern = make("strided")
    q, k, v = (torch.randn(1, 2, 50, 8) for _ in range(3))
    base = sp.sparse_attention(q, k, v, pattern)
    torch.testing.assert_close(sp.sparse_attention(q, k, v, pattern, dropout=0.5, training=False), base)
    dropped = sp.sparse_attention(q, k, v, pattern, dropout=0.5, training=True)
    assert torch.isfinite(dropped).all() and not torch.allclose(dropped, base)
    for name in ("local", "block"):
        half = sp.sparse_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), make(name))
        assert half.dtype == torch.bfloat16
        full = sp.sparse_attention(q, k, v, make(name))
        torch.testing.assert_close(half.float(), full, atol=5e-2, rtol=5e-2)
    half = sp.sparse_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), pattern)
    torch.testing.assert_close(half.float(), base, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("blocked", [True, False], ids=["blocked", "dense-fallback"])
def test_device_agnostic_on_meta(monkeypatch, blocked):
    """No GPU here: the meta device still rejects any CPU tensor mixed into elementwise ops."""
    if blocked:
        monkeypatch.setattr(sp, "DENSE_FALLBACK_MAX_LEN", 0)
        monkeypatch.setattr(sp, "DENSE_FALLBACK_DENSITY", float("inf"))
    table = torch.randn(2, 9, device="meta", requires_grad=True)
    pad = torch.ones(2, 40, dtype=torch.bool, device="meta")
    positions = torch.ones(2, 40, dtype=torch.long, device="meta")
    for name, pos in itertools.product(("local", "strided", "block"), (positions, None)):
        q, k, v = (torch.randn(2, 2, 40, 8, device="meta", requires_grad=True) for _ in "qkv")
        out = sp.sparse_attention(
            q,
            k,
            v,
            make(name),
            causal=True,
            key_padding_mask=pad,
            positions=pos,
            score_bias=lambda rel: table[:, rel.clamp(-4, 4) + 4],
        )
        out.sum().backward()
        assert out.device.type == "meta" and q.grad.device.type == "meta"


def test_input_validation():
    x = torch.randn(1, 2, 10, 4)
    with pytest.raises(ValueError, match="key_padding_mask"):
        sp.sparse_attention(x, x, x, PATTERNS["local"], key_padding_mask=torch.ones(1, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\[B, H, L, D\]"):
        sp.sparse_attention(x, x[:, :, :5], x, PATTERNS["local"])


# --------------------------------------------------------------------------------------------------
# FlexAttention (compiled; CPU forward only: no CPU backward in torch 2.13)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("name", ["local", "strided", "block"])
def test_flex_block_mask_covers_pattern(name, causal):
    """The BlockMask (uncompiled creation, cheap) keeps every block with an allowed entry, exactly."""
    pattern, seq_len, block = make(name), 300, 128
    block_mask = sp.flex_block_mask(pattern, seq_len, causal=causal)
    assert block_mask is sp.flex_block_mask(pattern, seq_len, causal=causal)  # cached without padding
    dense = pattern.dense_mask(seq_len, seq_len, causal=causal)
    idx = torch.arange(seq_len)
    assert torch.equal(block_mask.mask_mod(0, 0, idx[:, None], idx[None, :]), dense)
    padded = torch.nn.functional.pad(dense, (0, 84, 0, 84)).view(3, block, 3, block)
    assert torch.equal(block_mask.to_dense()[0, 0], padded.any(3).any(1))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["local", "strided", "block"])
def test_flex_forward_matches_dense(name):
    """Compiled flex forward on CPU (tens of seconds of compilation per pattern, hence slow)."""
    pattern = make(name)
    seq_len, heads = 160, 2
    q, k, v = (torch.randn(2, heads, seq_len, 16) for _ in range(3))
    pad = torch.ones(2, seq_len, dtype=torch.bool)
    pad[1, 150:] = False
    slopes = torch.tensor([0.5, 0.25])

    def bias_fn(rel):
        return -slopes.view(-1, *[1] * rel.dim()) * rel.abs()

    # Every (pattern, causal, padding, score_mod) is its own graph: this test alone makes 12, over
    # dynamo's default limit of 8, after which flex silently runs its unfused eager path.
    with warnings.catch_warnings(), torch._dynamo.config.patch(recompile_limit=64):
        warnings.filterwarnings("error", message=".*without torch.compile.*")  # no silent eager fallback
        for causal in (False, True):
            out = sp.flex_sparse_attention(
                q, k, v, pattern, causal=causal, key_padding_mask=pad, score_bias=bias_fn
            )
            ref = reference(q, k, v, pattern, causal, pad, bias_fn, None)
            real = pad[:, :, None, None]
            torch.testing.assert_close(out * real, ref * real, atol=2e-5, rtol=2e-5)
            plain = sp.flex_sparse_attention(q, k, v, pattern, causal=causal)
            ref = reference(q, k, v, pattern, causal, None, None, None)
            torch.testing.assert_close(plain, ref, atol=2e-5, rtol=2e-5)
