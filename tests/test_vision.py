"""Vision models: 2-D positions against their formulas and transformers' ViT, grid sparse patterns by brute
force, losses against torch's, kernels, save/load, remote code without our package, the offline pipeline."""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForImageClassification, ViTConfig
from transformers.models.t5.modeling_t5 import T5Attention
from transformers.models.vit.modeling_vit import ViTEmbeddings

import hf_attention.attention_sparse as sp
from hf_attention import (
    HfAttentionConfig,
    HfAttentionForImageClassification,
    HfAttentionVisionModel,
    make_image_processor,
)
from hf_attention.attention_sparse_2d import GridBlockPattern, GridLocalPattern, GridStridedPattern
from hf_attention.positions_2d_hf_attention import (
    AlibiBias2D,
    RelativePositionBias2D,
    RotaryEmbedding2D,
    grid_position_ids,
)
from hf_attention.variants import position_embedding_types

POSITION_EMBEDDING_TYPES = position_embedding_types()

VARIANTS = [(a, p) for a in ("standard", "sparse", "additive") for p in POSITION_EMBEDDING_TYPES] + [("rope", "rope")]
IDS = [f"{a}+{p}" for a, p in VARIANTS]
ANY_SIZE = ("sinusoidal", "rope", "alibi", "relative", "none")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is fastest, and immune to a busy second core (DESIGN.md)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def vision_config(**overrides) -> HfAttentionConfig:
    base = dict(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, norm_position="pre",
        num_labels=3, sparse_window_size=2, sparse_stride=2, sparse_block_size=2, sparse_num_global_tokens=1,
        sparse_num_random_blocks=1, relative_attention_num_buckets=8, relative_attention_max_distance=16,
    )
    base.update(overrides)
    return HfAttentionConfig(**base)


def build(cls=HfAttentionForImageClassification, **overrides):
    torch.manual_seed(0)
    return cls(vision_config(**overrides)).eval()


def variant(attention: str, position: str) -> dict:
    return {"attention_type": attention, "position_embedding_type": position}


def patch_coords(height: int, width: int, prefix: int) -> list[tuple[int, int] | None]:
    """Sequence index -> (row, col), None for [CLS]; written independently of the model's decoding."""
    return [None] * prefix + [(r, c) for r in range(height) for c in range(width)]


# --------------------------------------------------------------------------------------------------
# Every variant: shapes, outputs, losses
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("attention,position", VARIANTS, ids=IDS)
def test_every_variant_runs_and_losses_follow_problem_type(attention, position, pooling):
    model = build(**variant(attention, position), pooling=pooling)
    pixels = torch.randn(2, 3, 16, 16)
    seq = 16 + (pooling == "cls")
    out = model(pixels, output_hidden_states=True, output_attentions=True)
    assert out.logits.shape == (2, 3) and torch.isfinite(out.logits).all()
    assert len(out.hidden_states) == 3 and all(h.shape == (2, seq, 32) for h in out.hidden_states)
    assert len(out.attentions) == 2
    for probs in out.attentions:
        assert probs.shape == (2, 4, seq, seq)
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, seq))

    labels = torch.tensor([0, 2])
    loss = model(pixels, labels=labels).loss
    assert model.config.problem_type == "single_label_classification"
    torch.testing.assert_close(loss, F.cross_entropy(out.logits, labels))
    model.config.problem_type = None
    multi = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    loss = model(pixels, labels=multi).loss
    assert model.config.problem_type == "multi_label_classification"
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(out.logits, multi))
    model.config.problem_type = "regression"
    target = torch.randn(2, 3)
    torch.testing.assert_close(model(pixels, labels=target).loss, F.mse_loss(out.logits, target))

    model.config.problem_type = None
    model.train()
    model(pixels, labels=labels).loss.backward()
    conv = model.model.embeddings.patch_embeddings.projection.weight
    assert conv.grad is not None and torch.isfinite(conv.grad).all() and conv.grad.abs().sum() > 0


def test_single_output_regression_is_inferred_and_tuple_outputs():
    model = build(num_labels=1)
    pixels = torch.randn(3, 3, 16, 16)
    target = torch.randn(3)
    out = model(pixels, labels=target)
    assert model.config.problem_type == "regression"
    torch.testing.assert_close(out.loss, F.mse_loss(out.logits.squeeze(), target))
    loss, logits = model(pixels, labels=target, return_dict=False)[:2]
    torch.testing.assert_close(logits, out.logits)
    base = build(HfAttentionVisionModel)(pixels)
    assert base.last_hidden_state.shape == (3, 17, 32)
    torch.testing.assert_close(base.pooler_output, base.last_hidden_state[:, 0])
    mean = build(HfAttentionVisionModel, pooling="mean")(pixels)
    torch.testing.assert_close(mean.pooler_output, mean.last_hidden_state.mean(1))


def test_post_norm_normalises_embeddings_and_pre_norm_has_a_final_norm():
    pre, post = build(norm_position="pre").model, build(norm_position="post").model
    assert pre.final_layer_norm is not None and pre.embeddings.layer_norm is None
    assert post.final_layer_norm is None and post.embeddings.layer_norm is not None
    assert all(layer.pre_norm for layer in pre.layers) and not any(layer.pre_norm for layer in post.layers)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = build(attention_type="sparse", position_embedding_type="relative").train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        torch.manual_seed(2)
        model(torch.randn(2, 3, 16, 16), labels=torch.tensor([1, 2])).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and "model.score_bias.relative_attention_bias.weight" in grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


def test_bad_inputs_are_explained():
    model = build()
    with pytest.raises(ValueError, match="num_channels=3"):
        model(torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match="not a multiple of patch_size=4"):
        build(position_embedding_type="alibi")(torch.randn(1, 3, 18, 16))
    with pytest.raises(ValueError, match="interpolate_pos_encoding=True"):
        model(torch.randn(1, 3, 24, 24))


def test_new_parameters_are_initialised_like_vit():
    model = build(hidden_size=256, num_attention_heads=4, image_size=64, initializer_range=0.05)
    emb = model.model.embeddings
    for tensor in (emb.cls_token, emb.position_embeddings.weight, emb.patch_embeddings.projection.weight):
        assert abs(tensor.std().item() - 0.05) < 0.01, tensor.shape
    assert torch.count_nonzero(emb.patch_embeddings.projection.bias) == 0


# --------------------------------------------------------------------------------------------------
# 2-D positional meanings against their formulas
# --------------------------------------------------------------------------------------------------


def test_sinusoidal_2d_is_the_vaswani_formula_per_half():
    model = build(position_embedding_type="sinusoidal")
    emb = model.model.embeddings
    with torch.no_grad():
        emb.patch_embeddings.projection.weight.zero_()
        emb.patch_embeddings.projection.bias.zero_()
    height, width = 3, 5  # non-square, so a row/column mix-up fails
    pixels = torch.randn(1, 3, 4 * height, 4 * width)
    ids = grid_position_ids(height, width, 1)
    out = emb(pixels, ids, (height, width))[0]
    torch.testing.assert_close(out[0], emb.cls_token[0, 0])  # [CLS]: no positional term
    half = 16
    for index, (row, col) in enumerate(patch_coords(height, width, 0), start=1):
        expected = []
        for pos in (row, col):
            for i in range(half // 2):
                angle = pos / 10000 ** (2 * i / half)
                expected += [math.sin(angle), math.cos(angle)]
        torch.testing.assert_close(out[index], torch.tensor(expected), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head_dim", [8, 12])
def test_rope_2d_rotates_half_the_pairs_by_row_and_half_by_column(head_dim):
    rope = RotaryEmbedding2D(head_dim, theta=100.0)
    height, width = 3, 4
    cos, sin = rope(grid_position_ids(height, width, 1))
    pairs = head_dim // 2
    row_pairs = (pairs + 1) // 2
    col_pairs = pairs - row_pairs
    torch.testing.assert_close(cos[0, 0], torch.ones(head_dim))  # [CLS] is not rotated
    torch.testing.assert_close(sin[0, 0], torch.zeros(head_dim))
    for index, (row, col) in enumerate(patch_coords(height, width, 0), start=1):
        angles = [row * 100.0 ** (-j / row_pairs) for j in range(row_pairs)]
        angles += [col * 100.0 ** (-j / col_pairs) for j in range(col_pairs)]
        angles = torch.tensor(angles * 2)  # rotate-half layout: pair i is (x[i], x[i + D/2])
        torch.testing.assert_close(cos[0, index], angles.cos(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sin[0, index], angles.sin(), rtol=1e-5, atol=1e-6)


def _first_layer_probs(model, position_ids, grid):
    """Eager probabilities of layer 0's attention for fixed hidden states and the given 2-D ids."""
    attn = model.model.layers[0].self_attn
    torch.manual_seed(1)
    hidden = torch.randn(1, position_ids.shape[1], 32)
    inputs = model.model.attention_inputs(position_ids, grid)
    return attn(hidden, inputs, output_attentions=True)[1]


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("attention,position", [("rope", "rope"), ("standard", "alibi"), ("standard", "relative"),
                                                ("sparse", "rope"), ("sparse", "relative")])
def test_relative_2d_types_see_only_offsets(attention, position, pooling):
    """Translating the whole grid leaves attention unchanged; stretching it (other offsets) does not.

    [CLS] is unrotated, so under RoPE its scores with patches see absolute positions (as in RoPE-ViT); the
    patch-to-patch attention (renormalised over patch keys) is invariant for every type.
    """
    model = build(**variant(attention, position), pooling=pooling)
    grid, prefix = (4, 4), int(pooling == "cls")
    base = _first_layer_probs(model, grid_position_ids(*grid, prefix), grid)
    shifted = _first_layer_probs(model, grid_position_ids(*grid, prefix, row_offset=5, col_offset=11), grid)

    def patches(probs):
        block = probs[..., prefix:, prefix:]
        return block / block.sum(-1, keepdim=True)

    torch.testing.assert_close(patches(shifted), patches(base), rtol=1e-5, atol=1e-6)
    if position != "rope":  # biases leave [CLS] alone entirely
        torch.testing.assert_close(shifted, base, rtol=1e-5, atol=1e-6)
    ids = grid_position_ids(*grid, prefix)
    rows, cols = torch.arange(16) // 4, torch.arange(16) % 4
    stretched = torch.cat([ids[:, :prefix], (2 * rows * 2**16 + cols)[None]], dim=1)
    assert not torch.allclose(patches(_first_layer_probs(model, stretched, grid)), patches(base), atol=1e-4)


def test_alibi_2d_bias_is_minus_slope_times_euclidean_distance():
    model = build(position_embedding_type="alibi")
    height, width = 3, 5
    ids = grid_position_ids(height, width, 1)
    bias = model.model.attention_inputs(ids, (height, width)).score_bias(torch.float32)[0]  # [H, L, L]
    coords = patch_coords(height, width, 1)
    slopes = [2 ** (-8 * (h + 1) / 4) for h in range(4)]
    expected = torch.zeros_like(bias)
    for q, qc in enumerate(coords):
        for k, kc in enumerate(coords):
            if qc is not None and kc is not None:
                dist = math.hypot(kc[0] - qc[0], kc[1] - qc[1])
                expected[:, q, k] = torch.tensor([-s * dist for s in slopes])
    torch.testing.assert_close(bias, expected)
    assert isinstance(model.model.score_bias, AlibiBias2D)


def test_relative_2d_bias_is_a_learned_scalar_per_pair_of_t5_buckets():
    model = build(position_embedding_type="relative")
    module = model.model.score_bias
    assert isinstance(module, RelativePositionBias2D)
    with torch.no_grad():
        module.relative_attention_bias.weight.normal_()
    table = module.relative_attention_bias.weight  # [buckets^2, H]
    height, width = 4, 6
    ids = grid_position_ids(height, width, 1)
    bias = model.model.attention_inputs(ids, (height, width)).score_bias(torch.float32)[0]
    coords = patch_coords(height, width, 1)
    n = 8
    expected = torch.zeros_like(bias)
    by_offset: dict[tuple[int, int], torch.Tensor] = {}
    zero = T5Attention._relative_position_bucket(torch.tensor(0), True, n, 16)
    for q, qc in enumerate(coords):
        for k, kc in enumerate(coords):
            if qc is None or kc is None:  # [CLS] to and from patches: 0; to itself: the zero offset's bias
                if q == k:
                    expected[:, q, k] = table[int(zero) * n + int(zero)]
                continue
            dr, dc = kc[0] - qc[0], kc[1] - qc[1]
            br = T5Attention._relative_position_bucket(torch.tensor(dr), True, n, 16)
            bc = T5Attention._relative_position_bucket(torch.tensor(dc), True, n, 16)
            expected[:, q, k] = table[int(br) * n + int(bc)]
            by_offset.setdefault((dr, dc), bias[:, q, k])
            torch.testing.assert_close(bias[:, q, k], by_offset[(dr, dc)])  # only the 2-D offset matters
    torch.testing.assert_close(bias, expected)
    assert len({(br, bc) for br, bc in by_offset}) > 30


# --------------------------------------------------------------------------------------------------
# Sparse patterns over the grid
# --------------------------------------------------------------------------------------------------


def brute_force_mask(kind: str, height: int, width: int, prefix: int, size: int) -> torch.Tensor:
    coords = patch_coords(height, width, prefix)
    n = len(coords)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for q, qc in enumerate(coords):
        for k, kc in enumerate(coords):
            if qc is None or kc is None or q == k:
                mask[q, k] = True
                continue
            dr, dc = abs(kc[0] - qc[0]), abs(kc[1] - qc[1])
            if kind == "local":
                mask[q, k] = dr <= size // 2 and dc <= size // 2
            else:  # strided: local square of reach size - 1, or the stride lattice
                mask[q, k] = (dr < size and dc < size) or (dr % size == 0 and dc % size == 0)
    return mask


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("kind,size", [("local", 2), ("local", 4), ("strided", 2), ("strided", 3)])
def test_grid_patterns_zero_exactly_what_the_2d_rule_excludes(kind, size, pooling):
    model = build(attention_type="sparse", sparse_pattern=kind, sparse_window_size=size, sparse_stride=size,
                  position_embedding_type="alibi", pooling=pooling)
    height, width = 5, 6
    prefix = int(pooling == "cls")
    expected = brute_force_mask(kind, height, width, prefix, size)
    assert not expected.all()
    out = model(torch.randn(2, 3, 4 * height, 4 * width), output_attentions=True)
    for probs in out.attentions:
        assert (probs[:, :, ~expected] == 0).all(), "outside the 2-D neighbourhood must be exactly zero"
        assert (probs[:, :, expected] > 0).all()
        if prefix:  # [CLS] attends every patch and every patch attends [CLS]
            assert (probs[:, :, 0, :] > 0).all() and (probs[:, :, :, 0] > 0).all()
    torch.testing.assert_close(model.model.grid_pattern(height, width).dense_mask(expected.shape[0], expected.shape[0]),
                               expected)


def test_grid_block_pattern_tiles_globals_and_random_tiles():
    height = width = 8  # 4 x 4 tiles of 2 x 2 patches
    pattern = GridBlockPattern(grid_height=height, grid_width=width, num_prefix_tokens=1, block_size=2,
                               num_global_tokens=1, num_random_blocks=1, seed=3)
    n = 1 + height * width
    mask = pattern.dense_mask(n, n)
    coords = patch_coords(height, width, 1)
    assert mask[0].all() and mask[:, 0].all()
    extra_tiles: dict[tuple[int, int], set] = {}
    for q, qc in enumerate(coords):
        if qc is None:
            continue
        qt = (qc[0] // 2, qc[1] // 2)
        extra = set()
        for k, kc in enumerate(coords):
            if kc is None:
                continue
            kt = (kc[0] // 2, kc[1] // 2)
            if abs(kt[0] - qt[0]) <= 1 and abs(kt[1] - qt[1]) <= 1:
                assert mask[q, k], (qc, kc)
            elif mask[q, k]:
                extra.add(kt)
        assert len(extra) == 1  # exactly one random tile...
        extra_tiles.setdefault(qt, extra)
        assert extra_tiles[qt] == extra  # ...shared by every query of the tile
        (tile,) = extra
        tile_keys = [k for k, kc in enumerate(coords) if kc is not None and (kc[0] // 2, kc[1] // 2) == tile]
        assert mask[q, tile_keys].all()
    again = GridBlockPattern(grid_height=height, grid_width=width, num_prefix_tokens=1, block_size=2,
                             num_global_tokens=1, num_random_blocks=1, seed=3)
    assert torch.equal(again.dense_mask(n, n), mask)
    mean = GridBlockPattern(grid_height=height, grid_width=width, num_prefix_tokens=0, block_size=2,
                            num_global_tokens=1, num_random_blocks=0)
    assert mean.dense_mask(64, 64)[0].all() and mean.dense_mask(64, 64)[:, 0].all()  # first patch is global
    with pytest.raises(ValueError, match="block_size=0"):
        GridBlockPattern(grid_height=2, grid_width=2, block_size=0)
    with pytest.raises(ValueError, match="window_size=-1"):
        GridLocalPattern(grid_height=2, grid_width=2, window_size=-1)


@pytest.fixture
def force_blocked(monkeypatch):
    """Small grids would take the dense fallback: force the block-skipping kernel."""
    monkeypatch.setattr(sp, "DENSE_FALLBACK_MAX_LEN", 0)
    monkeypatch.setattr(sp, "DENSE_FALLBACK_DENSITY", float("inf"))


@pytest.mark.parametrize("pattern,bias,skips", [
    (GridLocalPattern(grid_height=12, grid_width=12, num_prefix_tokens=1, window_size=2), "alibi", True),
    (GridStridedPattern(grid_height=7, grid_width=9, num_prefix_tokens=1, stride=3), "relative", False),
    (GridBlockPattern(grid_height=8, grid_width=9, num_prefix_tokens=1, block_size=2, num_random_blocks=2), "alibi",
     False),
    (GridLocalPattern(grid_height=10, grid_width=12, num_prefix_tokens=0, window_size=2), None, True),
], ids=["local+alibi", "strided+relative", "block+alibi", "local-mean"])
def test_block_skipping_kernel_serves_grid_patterns_exactly(force_blocked, pattern, bias, skips):
    """Generic layouts derived from `allowed`: forward and gradients equal dense masked softmax."""
    torch.manual_seed(0)
    n, heads = pattern.seq_len, 2
    ids = grid_position_ids(pattern.grid_height, pattern.grid_width, pattern.num_prefix_tokens)
    bias_fn = {"alibi": AlibiBias2D(heads), "relative": RelativePositionBias2D(heads, 8, 16), None: None}[bias]
    if bias == "relative":
        bias_fn = bias_fn.double()
    q, k, v = (torch.randn(1, heads, n, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = sp.sparse_attention(q, k, v, pattern, score_bias=bias_fn, positions=ids)
    scores = q @ k.transpose(-1, -2) / math.sqrt(8)
    if bias_fn is not None:
        scores = scores + bias_fn(ids[:, None, :] - ids[:, :, None]).movedim(0, 1).to(scores.dtype)
    mask = pattern.dense_mask(n, n)
    ref = (scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v).transpose(1, 2)
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(a, b)
    if skips:  # raster-order neighbourhoods are block-sparse; lattices and random tiles touch most blocks
        assert sp._layout(pattern, n, False, torch.device("cpu")).num_keys < n


@pytest.mark.parametrize("kind", ["local", "block"])
def test_sparse_model_through_the_blocked_kernel_matches_eager(force_blocked, kind):
    """SDPA runs `sparse_attention` with the model's 2-D bias hook; eager runs the dense mask."""
    model = build(attention_type="sparse", sparse_pattern=kind, position_embedding_type="relative")
    pixels = torch.randn(2, 3, 48, 48)  # 12 x 12 patches + [CLS]
    model.set_attn_implementation("sdpa")
    fast = model.model(pixels).last_hidden_state
    model.set_attn_implementation("eager")
    torch.testing.assert_close(fast, model.model(pixels).last_hidden_state, rtol=1e-4, atol=1e-5)
    if kind == "local":
        assert sp._layout(model.model.grid_pattern(12, 12), 145, False, torch.device("cpu")).num_keys < 145


# --------------------------------------------------------------------------------------------------
# Learned positions at other sizes
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("height,width", [(24, 24), (8, 20), (32, 16)])
def test_learned_interpolation_equals_vit(height, width):
    model = build()
    emb = model.model.embeddings
    vit = ViTEmbeddings(ViTConfig(image_size=16, patch_size=4, hidden_size=32))
    with torch.no_grad():
        vit.position_embeddings.copy_(emb.position_embeddings.weight)
    n = 1 + (height // 4) * (width // 4)
    expected = vit.interpolate_pos_encoding(torch.zeros(1, n, 32), height, width)
    torch.testing.assert_close(emb.interpolate_pos_encoding(height // 4, width // 4), expected)
    logits = model(torch.randn(2, 3, height, width), interpolate_pos_encoding=True).logits
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_learned_interpolation_is_the_identity_at_the_native_size(pooling):
    model = build(pooling=pooling)
    pixels = torch.randn(2, 3, 16, 16)
    assert torch.equal(model(pixels).logits, model(pixels, interpolate_pos_encoding=True).logits)
    out = model.model(torch.randn(1, 3, 24, 20), interpolate_pos_encoding=True)
    assert out.last_hidden_state.shape == (1, (pooling == "cls") + 30, 32)


@pytest.mark.parametrize("position", ANY_SIZE)
def test_other_positional_types_run_at_any_image_size(position):
    model = build(position_embedding_type=position)
    out = model.model(torch.randn(1, 3, 20, 28))
    assert out.last_hidden_state.shape == (1, 1 + 35, 32) and torch.isfinite(out.last_hidden_state).all()


# --------------------------------------------------------------------------------------------------
# Kernels, save/load, remote code, pipeline
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attention,position", VARIANTS, ids=IDS)
def test_eager_and_sdpa_agree(attention, position):
    model = build(**variant(attention, position))
    pixels = torch.randn(2, 3, 16, 16)
    model.set_attn_implementation("sdpa")
    fast = model(pixels).logits
    model.set_attn_implementation("eager")
    torch.testing.assert_close(fast, model(pixels).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("overrides", [
    dict(attention_type="rope", pooling="mean"),
    dict(attention_type="sparse", sparse_pattern="block", position_embedding_type="relative"),
    dict(position_embedding_type="learned", norm_position="post"),
], ids=["rope-mean", "sparse-block+relative", "learned-post"])
def test_save_and_load_are_exact(overrides, tmp_path):
    model = build(**overrides)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").exists()
    assert (tmp_path / "modeling_hf_attention_vision.py").exists()
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert type(loaded) is HfAttentionForImageClassification
    assert loaded.config.auto_map["AutoModelForImageClassification"].endswith(
        "modeling_hf_attention_vision.HfAttentionForImageClassification"
    )
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    for name in state:
        assert torch.equal(state[name], loaded_state[name]), name
    pixels = torch.randn(2, 3, 16, 16)
    assert torch.equal(model(pixels).logits, loaded(pixels).logits)
    base = HfAttentionVisionModel.from_pretrained(tmp_path).eval()
    assert torch.equal(base(pixels).last_hidden_state, model.model(pixels).last_hidden_state)


REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["hf_attention"] = None  # the package must not be importable: only the saved code may run
    import torch
    from transformers import AutoModelForImageClassification
    try:
        import hf_attention  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("hf_attention was importable")
    pixels = torch.load(sys.argv[1])
    for folder in sys.argv[2:]:
        model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        with torch.no_grad():
            torch.save(model(pixels).logits, folder + "/remote_logits.pt")
        print("loaded", type(model).__name__)
    """
)


def test_remote_code_loads_in_a_fresh_isolated_python(tmp_path):
    variants = [dict(attention_type="sparse", sparse_pattern="local", position_embedding_type="relative"),
                dict(attention_type="rope", pooling="mean")]
    pixels = torch.randn(2, 3, 16, 16)
    torch.save(pixels, tmp_path / "pixels.pt")
    folders, expected = [], []
    for i, overrides in enumerate(variants):
        model = build(**overrides)
        folder = tmp_path / f"model{i}"
        model.save_pretrained(folder)
        folders.append(str(folder))
        with torch.no_grad():
            expected.append(model(pixels).logits)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HOME"] = str(tmp_path / "hf_home")
    result = subprocess.run(
        [sys.executable, "-I", "-c", REMOTE_SCRIPT, str(tmp_path / "pixels.pt"), *folders],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("loaded HfAttentionForImageClassification") == 2
    for folder, logits in zip(folders, expected):
        torch.testing.assert_close(torch.load(folder + "/remote_logits.pt"), logits, rtol=1e-5, atol=1e-6)


def test_image_classification_pipeline_runs_offline_from_the_saved_folder(tmp_path):
    from PIL import Image
    from transformers import pipeline

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    id2label = {0: "cat", 1: "dog", 2: "bird"}
    model = build(id2label=id2label, label2id={v: k for k, v in id2label.items()})
    model.save_pretrained(tmp_path)
    image = Image.fromarray((torch.rand(40, 30, 3) * 255).to(torch.uint8).numpy())
    classifier = pipeline("image-classification", model=str(tmp_path))
    results = classifier(image, top_k=3)
    assert {r["label"] for r in results} == set(id2label.values())
    assert sum(r["score"] for r in results) == pytest.approx(1.0, abs=1e-4)
    processor = make_image_processor(model.config)
    pixels = processor(image, return_tensors="pt").pixel_values
    assert pixels.shape == (1, 3, 16, 16)
    with torch.no_grad():
        probs = model(pixels).logits.softmax(-1)[0]
    assert results[0]["label"] == id2label[int(probs.argmax())]
    assert results[0]["score"] == pytest.approx(float(probs.max()), abs=1e-5)
