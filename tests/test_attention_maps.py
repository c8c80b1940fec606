"""attention_maps(): weights for every variant and backend, the per-head summaries against naive formulas, plots,
the bertviz export and the CLI."""

import csv
import json
import math

import pytest
import torch
from PIL import Image

from hf_attention import (
    HfAttentionConfig,
    HfAttentionForCausalLM,
    HfAttentionForConditionalGeneration,
    HfAttentionForImageClassification,
    HfAttentionModel,
)
from hf_attention.attention_maps import (
    attention_entropy,
    attention_maps,
    export_bertviz,
    load_bertviz,
    mean_attention_distance,
    model_summary_metrics,
    patch_distances,
    plot_attention_grid,
    plot_patch_overlay,
    plot_summaries,
)
from hf_attention.registry_hf_attention import ATTENTION_SCORES
from hf_attention.variants import covering_variants, variant_name

VARIANTS = covering_variants()  # pairwise cover: every scoring x positions, x patterns
IDS = [variant_name(v["attention_type"], v["position_embedding_type"], v.get("sparse_pattern")) for v in VARIANTS]


def tiny(**overrides) -> HfAttentionConfig:
    base = dict(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=64,
        sparse_window_size=4, sparse_block_size=4, sparse_stride=4, relative_attention_num_buckets=8,
        relative_attention_max_distance=16, image_size=16, patch_size=4, num_channels=1,
    )
    base.update(overrides)
    return HfAttentionConfig(**base)


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_maps_under_sdpa_equal_eager_probabilities_and_restore_the_kernel(variant):
    torch.manual_seed(0)
    model = HfAttentionModel(tiny(**variant)).eval()
    ids = torch.randint(1, 50, (2, 17))
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    model.set_attn_implementation("sdpa")
    maps = attention_maps(model, {"input_ids": ids, "attention_mask": mask})
    assert model.config._attn_implementation == "sdpa"
    model.set_attn_implementation("eager")
    reference = model(ids, attention_mask=mask, output_attentions=True).attentions
    assert maps.stacks == ["encoder"] and len(maps.attentions["encoder"]) == 2
    for got, want in zip(maps.attentions["encoder"], reference):
        torch.testing.assert_close(got, want.float())
        # Rows of real queries are distributions; padded keys get nothing.
        if ATTENTION_SCORES[variant["attention_type"]].weights_sum_to_one:
            torch.testing.assert_close(got[:, :, :11].sum(-1), torch.ones(2, 4, 11))
        assert float(got[1, :, :11, 11:].abs().max()) == 0.0
    if variant.get("sparse_pattern"):
        pattern = model.sparse_pattern.dense_mask(17, 17, causal=False)
        assert float(maps.attentions["encoder"][0][0][:, ~pattern].abs().max()) == 0.0


def test_transformers_bert_under_sdpa_is_recomputed_in_eager():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, attn_implementation="sdpa")
    bert = BertModel(config).eval()
    ids = torch.randint(1, 50, (1, 9))
    maps = attention_maps(bert, {"input_ids": ids})
    assert bert.config._attn_implementation == "sdpa"
    bert.set_attn_implementation("eager")
    want = bert(ids, output_attentions=True).attentions
    for got, ref in zip(maps.attentions["encoder"], want):
        torch.testing.assert_close(got, ref)


def test_entropy_and_distance_against_naive_loops():
    torch.manual_seed(0)
    attn = torch.rand(2, 3, 5, 5).softmax(-1)
    positions = torch.tensor([[0, 1, 2, 3, 4]])
    q_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]).bool()
    dist = (positions[:, :, None] - positions[:, None]).abs().float()
    ent = attention_entropy(attn, q_mask, q_mask)
    mad = mean_attention_distance(attn, dist, q_mask, q_mask)
    for h in range(3):
        e_sum, d_sum, n = 0.0, 0.0, 0
        for b in range(2):
            keys = [k for k in range(5) if q_mask[b, k]]
            for q in keys:
                row = [float(attn[b, h, q, k]) for k in keys]
                z = sum(row)
                p = [x / z for x in row]
                e_sum += -sum(x * math.log(x) for x in p)
                d_sum += sum(x * abs(q - k) for x, k in zip(p, keys))
                n += 1
        assert ent[h].item() == pytest.approx(e_sum / n, rel=1e-5)
        assert mad[h].item() == pytest.approx(d_sum / n, rel=1e-5)
    uniform = torch.full((1, 1, 4, 4), 0.25)
    assert attention_entropy(uniform).item() == pytest.approx(math.log(4))
    assert attention_entropy(torch.eye(4)[None, None]).item() == pytest.approx(0.0, abs=1e-6)


def test_patch_distances_are_pixel_distances_between_patch_centres():
    d = patch_distances((2, 3), patch_size=4, num_prefix_tokens=1)[0]
    coords = [(r, c) for r in range(2) for c in range(3)]
    for i, (r1, c1) in enumerate(coords):
        for j, (r2, c2) in enumerate(coords):
            assert d[1 + i, 1 + j].item() == pytest.approx(4 * math.hypot(r1 - r2, c1 - c2))
    assert float(d[0].abs().max()) == 0.0 and float(d[:, 0].abs().max()) == 0.0


@pytest.mark.parametrize("position", ["learned", "alibi"])
def test_vision_maps_summaries_and_overlay(tmp_path, position):
    torch.manual_seed(0)
    model = HfAttentionForImageClassification(tiny(position_embedding_type=position, norm_position="pre",
                                                   num_labels=3)).eval()
    pixels = torch.randn(2, 1, 16, 16)
    maps = attention_maps(model, {"pixel_values": pixels})
    assert maps.grid == (4, 4) and maps.num_prefix_tokens == 1
    attn = maps.attentions["encoder"][0]
    assert attn.shape == (2, 4, 17, 17)
    summary = maps.summaries()["encoder"]
    # Mean distance by hand: patch queries, weights renormalised over patch keys.
    dist = patch_distances((4, 4), 4, 1)[0]
    w = attn[:, :, 1:, 1:]
    w = w / w.sum(-1, keepdim=True)
    want = (w * dist[1:, 1:]).sum(-1).mean(dim=(0, 2))
    torch.testing.assert_close(summary["distance"][0], want)
    assert plot_patch_overlay(maps, pixels[0], tmp_path / "o.png").stat().st_size > 1000
    assert plot_summaries(maps, tmp_path / "s.png").stat().st_size > 1000
    metrics = model_summary_metrics(maps)
    assert set(metrics) == {"attn_entropy_encoder", "attn_distance_encoder"}


def test_seq2seq_and_causal_stacks(tmp_path):
    torch.manual_seed(0)
    seq2seq = HfAttentionForConditionalGeneration(tiny(is_encoder_decoder=True, decoder_start_token_id=1)).eval()
    ids = torch.randint(2, 50, (1, 7))
    maps = attention_maps(seq2seq, {"input_ids": ids, "decoder_input_ids": ids[:, :5]})
    assert maps.stacks == ["encoder", "decoder", "cross"]
    assert maps.attentions["cross"][0].shape == (1, 4, 5, 7)
    # Causal decoder self-attention: nothing above the diagonal.
    assert float(maps.attentions["decoder"][0][0].triu(1).abs().max()) == 0.0
    summary = maps.summaries()
    assert torch.isnan(summary["cross"]["distance"]).all()  # no distance between a target and a source token
    assert plot_attention_grid(maps, tmp_path / "x.png", stack="cross").stat().st_size > 1000

    causal = HfAttentionForCausalLM(tiny(norm_position="pre")).eval()
    maps = attention_maps(causal, {"input_ids": ids}, layers=[-1])
    assert maps.stacks == ["decoder"] and len(maps.attentions["decoder"]) == 1


def test_bertviz_export_round_trip(tmp_path):
    torch.manual_seed(0)
    model = HfAttentionModel(tiny()).eval()
    ids = torch.randint(1, 50, (1, 6))
    maps = attention_maps(model, {"input_ids": ids})
    maps.tokens = [[f"t{i}" for i in range(6)]]
    loaded = load_bertviz(export_bertviz(maps, tmp_path / "b.json"))
    assert loaded["tokens"] == maps.tokens[0]
    assert len(loaded["attention"]) == 2
    for got, want in zip(loaded["attention"], maps.attentions["encoder"]):
        assert got.shape == (1, 4, 6, 6)
        torch.testing.assert_close(got, want)


def test_cli_writes_grids_summaries_and_bertviz(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from hf_attention.cli_maps import main

    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate("the cat sat on a mat".split())}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
    model = HfAttentionModel(tiny(vocab_size=len(vocab)))
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    assert main([str(tmp_path / "m"), "--text", "the cat sat on a mat", "--output_dir", str(tmp_path / "o")]) == 0
    out = tmp_path / "o"
    assert (out / "attention_encoder.png").stat().st_size > 1000
    data = json.loads((out / "bertviz.json").read_text())
    assert data["tokens"] == "the cat sat on a mat".split()
    rows = list(csv.DictReader(open(out / "summaries.csv")))
    assert len(rows) == 2 * 4 and {r["stack"] for r in rows} == {"encoder"}

    image_model = HfAttentionForImageClassification(tiny(num_labels=2))
    image_model.save_pretrained(tmp_path / "v")
    Image.fromarray((torch.rand(16, 16) * 255).byte().numpy()).save(tmp_path / "img.png")
    assert main([str(tmp_path / "v"), "--image", str(tmp_path / "img.png"), "--output_dir", str(tmp_path / "vo")]) == 0
    assert (tmp_path / "vo" / "overlay.png").stat().st_size > 1000
    with pytest.raises(SystemExit):
        main(["/no/such/model", "--text", "x", "--output_dir", str(tmp_path / "z")])
