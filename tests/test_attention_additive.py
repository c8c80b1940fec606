"""Additive (Bahdanau) attention against an independent broadcast reference.

The reference below is written out here on purpose (not imported from the module) so that a wrong
formula in the module cannot make both sides agree. Most cases force the eager tiled path with a
tiny tile budget, so that several tiles (and split key rows) are exercised on small shapes.
"""

from __future__ import annotations

import math
import time
import warnings

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from hf_attention import attention_additive as aa
from hf_attention.attention_additive import additive_attention, additive_scores, naive_additive_scores

F64 = torch.float64


def reference_scores(qa: torch.Tensor, ka: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # [B,H,Lq,1,A] + [B,H,1,Lk,A] -> tanh -> weighted sum over A with v [H,A]
    return torch.einsum("bhija,ha->bhij", torch.tanh(qa[:, :, :, None, :] + ka[:, :, None, :, :]), v)


def reference_attention(query, key, value, w_q, w_k, b, v, bias=None):
    qa = torch.einsum("bhld,hda->bhla", query, w_q)
    if b is not None:
        qa = qa + b[None, :, None, :]
    ka = torch.einsum("bhld,hda->bhla", key, w_k)
    scores = reference_scores(qa, ka, v)
    if bias is not None:
        scores = scores + bias
    probs = torch.softmax(scores, dim=-1)
    return (probs @ value).transpose(1, 2), probs


def make(b=2, h=3, lq=5, lk=7, d=6, a=4, dv=5, dtype=F64, scale=1.0, with_b=True):
    def p(*shape, s=1.0):
        return (torch.randn(*shape, dtype=dtype) * s).requires_grad_()

    return {
        "query": p(b, h, lq, d, s=scale),
        "key": p(b, h, lk, d, s=scale),
        "value": p(b, h, lk, dv),
        "w_q": p(h, d, a),
        "w_k": p(h, d, a),
        "b": p(h, a) if with_b else None,
        "v": p(h, a),
    }


def grads(
    out: torch.Tensor, inputs: dict[str, torch.Tensor | None], seed: int = 1
) -> dict[str, torch.Tensor]:
    names = [n for n, t in inputs.items() if t is not None and t.requires_grad]
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    res = torch.autograd.grad(out, [inputs[n] for n in names], g)
    return dict(zip(names, res))


def padding_bias(b, lq, lk, dtype=F64, pad=2):
    """[B,1,1,Lk]: the last ``pad`` keys of batch row 0 are padding (finfo.min)."""
    bias = torch.zeros(b, 1, 1, lk, dtype=dtype)
    bias[0, ..., lk - pad :] = torch.finfo(dtype).min
    return bias


def alibi_bias(h, lq, lk, dtype=F64):
    """[1,H,Lq,Lk]: a positional bias (ALiBi-like, with a causal offset for Lq < Lk)."""
    slopes = torch.tensor([2.0 ** -(i + 1) for i in range(h)], dtype=dtype)
    dist = torch.arange(lk, dtype=dtype)[None, :] - (torch.arange(lq, dtype=dtype)[:, None] + lk - lq)
    return (slopes[:, None, None] * -dist.abs())[None]


def causal_bias(lq, lk, dtype=F64):
    """[Lq,Lk]: query i (the last Lq positions) sees keys up to its own position."""
    allowed = torch.ones(lq, lk, dtype=torch.bool).tril(diagonal=lk - lq)
    return torch.zeros(lq, lk, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


CASES = {
    "square": dict(lq=6, lk=6),
    "lq_ne_lk": dict(lq=5, lk=9),
    "decode_lq1": dict(lq=1, lk=11),
    "no_b": dict(lq=4, lk=4, with_b=False),
    "one_head_one_batch": dict(b=1, h=1, lq=3, lk=8),
}


@pytest.mark.parametrize("bias_kind", [None, "padding", "alibi", "causal"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("chunk_bytes", [200, None], ids=["tiny_tiles", "default_tiles"])
def test_attention_matches_reference_forward_and_grads(case, bias_kind, chunk_bytes):
    inp = make(**CASES[case])
    b, h, lq, lk = inp["query"].shape[0], inp["query"].shape[1], inp["query"].shape[2], inp["key"].shape[2]
    bias = {
        None: None,
        "padding": padding_bias(b, lq, lk),
        "alibi": alibi_bias(h, lq, lk),
        "causal": causal_bias(lq, lk),
    }[bias_kind]
    out, probs = additive_attention(
        **inp, attention_mask=bias, output_attentions=True, backend="eager", chunk_bytes=chunk_bytes
    )
    ref_out, ref_probs = reference_attention(**inp, bias=bias)
    assert out.shape == (b, lq, h, inp["value"].shape[-1])
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(probs, ref_probs)
    got, want = grads(out, inp), grads(ref_out, inp)
    assert set(got) == (
        {"query", "key", "value", "w_q", "w_k", "v"} | ({"b"} if inp["b"] is not None else set())
    )
    for name in got:
        torch.testing.assert_close(got[name], want[name], msg=lambda m, n=name: f"grad {n}: {m}")


def test_learned_bias_gets_gradients():
    """A learned positional bias (relative-position style) is added in place; its grad must survive."""
    inp = make(lq=4, lk=6)
    inp["bias"] = (torch.randn(1, 3, 4, 6, dtype=F64) * 0.5).requires_grad_()
    out, _ = additive_attention(
        **{k: t for k, t in inp.items() if k != "bias"}, attention_mask=inp["bias"], backend="eager"
    )
    ref_out, _ = reference_attention(**inp)
    torch.testing.assert_close(out, ref_out)
    got, want = grads(out, inp), grads(ref_out, inp)
    assert "bias" in got
    for name in got:
        torch.testing.assert_close(got[name], want[name], msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("scale", [0.5, 30.0, 500.0])
def test_scores_and_grads_both_forms(scale):
    """Small inputs take the exp form, huge ones (past exp's range even after centring) the sigmoid form."""
    qa = (torch.randn(2, 2, 5, 8, dtype=F64) * scale).requires_grad_()
    ka = (torch.randn(2, 2, 6, 8, dtype=F64) * scale + 3 * scale).requires_grad_()  # offset: centring matters
    v = torch.randn(2, 8, dtype=F64, requires_grad=True)
    form = aa._prepare(qa.detach().flatten(0, 1), ka.detach().flatten(0, 1))[2]
    assert form == ("sigmoid" if scale == 500.0 else "exp")
    s = additive_scores(qa, ka, v, backend="eager", chunk_bytes=300)
    ref = reference_scores(qa, ka, v)
    torch.testing.assert_close(s, ref)
    g = torch.randn_like(s)
    for got, want in zip(torch.autograd.grad(s, (qa, ka, v), g), torch.autograd.grad(ref, (qa, ka, v), g)):
        torch.testing.assert_close(got, want)


def test_gradcheck():
    qa = torch.randn(1, 2, 3, 4, dtype=F64, requires_grad=True)
    ka = torch.randn(1, 2, 5, 4, dtype=F64, requires_grad=True)
    v = torch.randn(2, 4, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, w: additive_scores(q, k, w, backend="eager", chunk_bytes=64), (qa, ka, v), fast_mode=True
    )
    assert torch.autograd.gradcheck(
        lambda q, k, w: additive_scores(q, k, w, backend="eager"), (qa, ka, v), fast_mode=True
    )
    big = (qa.detach() * 400).requires_grad_()  # sigmoid form
    assert torch.autograd.gradcheck(
        lambda q, k, w: additive_scores(q, k, w, backend="eager"), (big, ka, v), fast_mode=True
    )


def test_naive_reference_agrees_with_loops():
    qa, ka, v = (
        torch.randn(1, 2, 3, 4, dtype=F64),
        torch.randn(1, 2, 2, 4, dtype=F64),
        torch.randn(2, 4, dtype=F64),
    )
    loops = torch.tensor(
        [
            [
                [
                    [
                        sum(v[h, a] * math.tanh(qa[0, h, i, a] + ka[0, h, j, a]) for a in range(4))
                        for j in range(2)
                    ]
                    for i in range(3)
                ]
                for h in range(2)
            ]
        ],
        dtype=F64,
    )
    torch.testing.assert_close(naive_additive_scores(qa, ka, v), loops)
    torch.testing.assert_close(reference_scores(qa, ka, v), loops)


def test_fully_masked_row_finfo_min_is_uniform_and_finite():
    inp = make(b=2, lq=4, lk=6)
    bias = torch.zeros(2, 1, 4, 6, dtype=F64)
    bias[1, 0, 2, :] = torch.finfo(F64).min  # one query row sees no key at all
    out, probs = additive_attention(**inp, attention_mask=bias, output_attentions=True, backend="eager")
    ref_out, ref_probs = reference_attention(**inp, bias=bias)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(probs[1, :, 2], torch.full((3, 6), 1 / 6, dtype=F64))
    for name, g in grads(out, inp).items():
        assert torch.isfinite(g).all(), name


def test_fully_masked_row_neg_inf_gives_zeros_not_nan():
    inp = make(b=2, lq=4, lk=6)
    bias = torch.zeros(2, 3, 4, 6, dtype=F64)
    bias[:, :, :, 4:] = float("-inf")  # two padded keys everywhere
    bias[0, 1, 3, :] = float("-inf")  # and one dead row
    out, probs = additive_attention(**inp, attention_mask=bias, output_attentions=True, backend="eager")
    assert torch.isfinite(out).all() and torch.isfinite(probs).all()
    assert (probs[0, 1, 3] == 0).all() and (out[0, 3, 1] == 0).all()
    alive = bias.clone()
    alive[0, 1, 3, :] = 0.0  # elsewhere identical to the reference
    ref_out, ref_probs = reference_attention(**inp, bias=alive)
    keep = torch.ones_like(probs, dtype=torch.bool)
    keep[0, 1, 3] = False
    torch.testing.assert_close(probs[keep], ref_probs[keep])
    for name, g in grads(out, inp).items():
        assert torch.isfinite(g).all(), name


def test_bool_mask_follows_sdpa_convention():
    inp = make(lq=3, lk=5)
    keep = torch.rand(2, 1, 3, 5) > 0.3
    keep[..., 0] = True
    out_bool, _ = additive_attention(**inp, attention_mask=keep, backend="eager")
    out_float, _ = additive_attention(
        **inp,
        attention_mask=torch.zeros(keep.shape, dtype=F64).masked_fill(~keep, float("-inf")),
        backend="eager",
    )
    torch.testing.assert_close(out_bool, out_float)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs(dtype):
    inp64 = make(lq=4, lk=6, d=8, a=8, dv=8)
    inp = {k: (t.detach().to(dtype).requires_grad_() if t is not None else None) for k, t in inp64.items()}
    bias = padding_bias(2, 4, 6, dtype=dtype)
    out, probs = additive_attention(**inp, attention_mask=bias, output_attentions=True, backend="eager")
    assert out.dtype == dtype and probs.dtype == dtype
    ref_out, _ = reference_attention(
        **{k: (t.detach().to(F64) if t is not None else None) for k, t in inp.items()},
        bias=padding_bias(2, 4, 6),
    )
    tol = {torch.float16: 2e-2, torch.bfloat16: 8e-2, torch.float32: 1e-5}[dtype]
    torch.testing.assert_close(out.to(F64), ref_out, atol=tol, rtol=tol)
    out.float().sum().backward()
    assert inp["w_q"].grad.dtype == dtype and torch.isfinite(inp["w_q"].grad.float()).all()


def test_float32_sigmoid_form_large_values():
    """float32 leaves exp's range much sooner (|x| > 40): the fallback must take over, correctly."""
    qa = torch.randn(1, 2, 4, 8) * 60
    ka = torch.randn(1, 2, 5, 8) * 60
    v = torch.randn(2, 8)
    assert aa._prepare(qa.flatten(0, 1), ka.flatten(0, 1))[2] == "sigmoid"
    want = reference_scores(qa.double(), ka.double(), v.double())
    torch.testing.assert_close(
        additive_scores(qa, ka, v, backend="eager").double(), want, atol=1e-4, rtol=1e-4
    )


def test_dropout_and_outputs_flag():
    inp = make(lq=8, lk=8)
    out_eval, probs = additive_attention(**inp, dropout=0.5, training=False)
    assert probs is None
    torch.testing.assert_close(out_eval, reference_attention(**inp)[0])
    out_train, probs_train = additive_attention(**inp, dropout=0.5, training=True, output_attentions=True)
    assert (probs_train == 0).any() and not torch.allclose(out_train, out_eval)


def test_empty_keys_and_bad_shapes():
    inp = make(lq=3, lk=0)
    out, probs = additive_attention(**inp, output_attentions=True)
    assert out.shape == (2, 3, 3, 5) and (out == 0).all() and probs.shape == (2, 3, 3, 0)
    qa, ka = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match="v must be"):
        additive_scores(qa, ka, torch.randn(3, 4))
    with pytest.raises(ValueError, match="does not match"):
        additive_scores(qa, torch.randn(1, 3, 5, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="backend"):
        additive_scores(qa, ka, torch.randn(2, 4), backend="fast")


# ---------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "shape,budget",
    [((2, 2, 64, 72, 16), 2**14), ((1, 2, 4, 300, 16), 2**12), ((4, 3, 2, 5, 8), 2**20)],
)
def test_plan_tiles_respects_budget_and_covers(shape, budget):
    b, h, lq, lk, a = shape
    plan = aa.plan_tiles(b * h, lq, lk, a, 4, budget)
    assert math.prod(plan) * a * 4 <= max(budget, a * 4)
    seen = torch.zeros(b * h, lq, lk, dtype=torch.int64)
    for sn, sq, sk in aa._tiles(b * h, lq, lk, plan):
        seen[sn, sq, sk] += 1
    assert (seen == 1).all()


def _peak_allocated(fn) -> int:
    """Peak of live CPU allocations made by ``fn`` (from the profiler's per-op memory records)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    leaves = sorted((e for e in prof.events() if not e.cpu_children), key=lambda e: e.time_range.start)
    live = peak = 0
    for event in leaves:
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def test_forward_backward_memory_is_bounded():
    b, h, lq, lk, a = 2, 2, 64, 72, 16
    qa = torch.randn(b, h, lq, a, requires_grad=True)
    ka = torch.randn(b, h, lk, a, requires_grad=True)
    v = torch.randn(h, a, requires_grad=True)
    five_d = b * h * lq * lk * a * 4
    tile = five_d // 32

    def ours():
        additive_scores(qa, ka, v, backend="eager", chunk_bytes=tile).sum().backward()

    def naive():
        naive_additive_scores(qa, ka, v).sum().backward()

    assert _peak_allocated(naive) > five_d  # the probe sees a 5-D tensor when there is one
    peak = _peak_allocated(ours)
    scores = b * h * lq * lk * 4
    assert peak < 4 * scores + 2 * tile + 64 * 1024, (peak, five_d)
    assert peak < five_d / 2


# ---------------------------------------------------------------------------------------------
# compile switch, fallback and one compiled case
# ---------------------------------------------------------------------------------------------
def test_disable_env_and_compile_failure_fallback(monkeypatch):
    qa, ka, v = (
        torch.randn(1, 2, 3, 4, dtype=F64),
        torch.randn(1, 2, 5, 4, dtype=F64),
        torch.randn(2, 4, dtype=F64),
    )
    want = reference_scores(qa, ka, v)

    def no_compile(*args, **kwargs):
        raise AssertionError("torch.compile must not be called")

    monkeypatch.setattr(aa, "_compiled", {})
    monkeypatch.setattr(aa, "_compile_failed", False)
    monkeypatch.setattr(torch, "compile", no_compile)
    monkeypatch.setenv(aa.DISABLE_COMPILE_ENV, "1")
    torch.testing.assert_close(additive_scores(qa, ka, v, backend="compile"), want)

    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler")

        return run

    monkeypatch.delenv(aa.DISABLE_COMPILE_ENV)
    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        torch.testing.assert_close(additive_scores(qa, ka, v, backend="compile"), want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only, then eager silently
        torch.testing.assert_close(additive_scores(qa, ka, v, backend="compile"), want)


@pytest.mark.slow  # compiling the two kernels takes 15 s with a warm inductor cache, 45 s cold
def test_compiled_path_small(monkeypatch):
    """One compiled case (float32, small): the fused kernels agree with the reference."""
    monkeypatch.delenv(aa.DISABLE_COMPILE_ENV, raising=False)
    monkeypatch.setattr(aa, "_compile_failed", False)
    qa = torch.randn(1, 2, 6, 8, requires_grad=True)
    ka = torch.randn(1, 2, 7, 8, requires_grad=True)
    v = torch.randn(2, 8, requires_grad=True)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback would hide the compiled path
        s = additive_scores(qa, ka, v, backend="compile")
        g = torch.randn_like(s)
        got = torch.autograd.grad(s, (qa, ka, v), g)
    assert not aa._compile_failed
    ref = reference_scores(qa.double(), ka.double(), v.double())
    want = torch.autograd.grad(ref, (qa, ka, v), g.double())
    torch.testing.assert_close(s.double(), ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-5, rtol=1e-5)
    inp = make(lq=4, lk=6, d=8, a=8, dtype=torch.float32)
    bias = padding_bias(2, 4, 6, dtype=torch.float32)
    out, _ = additive_attention(**inp, attention_mask=bias, backend="compile")  # in-place bias add
    ref_out, _ = reference_attention(**inp, bias=bias)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    print(f"compiled fwd+bwd first call: {time.perf_counter() - start:.1f} s")
