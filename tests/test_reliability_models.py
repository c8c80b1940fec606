"""Loading, embeddings and API contracts of every model class (the issues transformers' common tests surfaced).

References are independent of the code under test: the source model's own tensors, transformers' BERT, and
checkpoint files written here by hand in the layout the previous code saved.
"""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_modeling import tiny_config
from transformers import AutoModel, BertConfig, BertForMaskedLM
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

import hf_attention as H
from hf_attention.cache_names import CACHE_FIELD

ENCODER = ("HfAttentionModel", "HfAttentionForMaskedLM", "HfAttentionForSequenceClassification",
           "HfAttentionForQuestionAnswering")
DECODER = ("HfAttentionDecoder", "HfAttentionForCausalLM")
SEQ2SEQ = ("HfAttentionEncoderDecoderModel", "HfAttentionForConditionalGeneration")
VISION = ("HfAttentionVisionModel", "HfAttentionForImageClassification")
FAMILY = {name: family for family, names in
          (("encoder", ENCODER), ("decoder", DECODER), ("seq2seq", SEQ2SEQ), ("vision", VISION)) for name in names}
CLASSES = {name: getattr(H, name) for name in FAMILY}


def config(**overrides):
    base = dict(encoder_layers=2, decoder_layers=2, decoder_start_token_id=2, image_size=16, patch_size=4,
                num_labels=3)
    base.update(overrides)
    return tiny_config(**base)


def stack(model, side: str | None = None):
    """The transformer stack of a model that carries `side` ("encoder"/"decoder"), or its only one."""
    base = getattr(model, "model", model)
    if isinstance(base, H.HfAttentionEncoderDecoderModel):
        return getattr(base, side)
    return base


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One saved checkpoint (and its model) per class."""
    root = tmp_path_factory.mktemp("checkpoints")
    saved = {}
    for name, cls in CLASSES.items():
        torch.manual_seed(len(saved))
        model = cls(config()).eval()
        model.save_pretrained(root / name)
        saved[name] = (root / name, model)
    return saved


def assert_stack_equal(loaded, source):
    """Every weight of `source` is in `loaded`, equal (a decoder-only stack has no cross-attention to take)."""
    expected = source.state_dict()
    got = loaded.state_dict()
    assert all("encoder_attn" in key for key in set(expected) - set(got)), set(expected) - set(got)
    for key in set(expected) & set(got):
        assert torch.equal(got[key], expected[key]), key


def _pairs():
    return [(s, t) for s in CLASSES for t in CLASSES]


@pytest.mark.parametrize(("source", "target"), _pairs(), ids=[f"{s}->{t}" for s, t in _pairs()])
def test_every_checkpoint_into_every_class_maps_what_applies_or_names_the_right_class(checkpoints, source, target):
    path, source_model = checkpoints[source]
    src, dst = FAMILY[source], FAMILY[target]
    cls = CLASSES[target]
    if src == dst:
        loaded, info = cls.from_pretrained(path, output_loading_info=True)
        assert_stack_equal(stack(loaded, "encoder"), stack(source_model, "encoder"))
        if src == "seq2seq":
            assert_stack_equal(stack(loaded, "decoder"), stack(source_model, "decoder"))
    elif src == "seq2seq" and dst in ("encoder", "decoder"):  # that side, as BartForCausalLM uses BART's decoder
        loaded, info = cls.from_pretrained(path, output_loading_info=True)
        assert_stack_equal(stack(loaded), stack(source_model, dst))
        assert not any(k.startswith(("embeddings.", "layers.", "model.embeddings.", "model.layers."))
                       for k in info["missing_keys"])
    elif src in ("encoder", "decoder") and dst == "seq2seq":  # warm start of that side
        loaded, info = cls.from_pretrained(path, output_loading_info=True)
        assert_stack_equal(stack(loaded, src), stack(source_model))
        assert stack(loaded, "encoder").embeddings.word_embeddings.weight is (
            stack(loaded, "decoder").embeddings.word_embeddings.weight
        )
        # Only what the source has no counterpart for: the other side and the decoder's cross-attention.
        assert not any((f"{src}." in k and "encoder_attn" not in k) or "shared" in k for k in info["missing_keys"])
    else:
        with pytest.raises(ValueError) as error:
            cls.from_pretrained(path)
        message = str(error.value)
        assert source in message and target in message
        for name in {"encoder": ENCODER, "decoder": DECODER, "seq2seq": SEQ2SEQ, "vision": VISION}[src]:
            assert name in message


def test_auto_model_of_a_seq2seq_checkpoint_is_its_encoder_with_its_weights(checkpoints):
    path, source_model = checkpoints["HfAttentionForConditionalGeneration"]
    loaded, info = AutoModel.from_pretrained(path, output_loading_info=True)
    assert type(loaded) is H.HfAttentionModel
    assert info["missing_keys"] == set()
    assert_stack_equal(loaded, source_model.model.encoder)
    ids = torch.randint(3, 50, (2, 9))
    torch.testing.assert_close(loaded(ids).last_hidden_state, source_model.model.encoder(ids).last_hidden_state)


def test_a_cross_loaded_model_saves_and_reloads_in_its_own_layout(checkpoints, tmp_path):
    path, source_model = checkpoints["HfAttentionEncoderDecoderModel"]
    encoder = H.HfAttentionModel.from_pretrained(path)
    encoder.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "model.safetensors"))
    assert "embeddings.word_embeddings.weight" in keys and not any(k.startswith("encoder.") for k in keys)
    reloaded, info = H.HfAttentionModel.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == set()
    assert_stack_equal(reloaded, source_model.encoder)


# ------------------------------------------------------------------------------------------------ resize (item 8)
@pytest.mark.parametrize("new_size", [60, 45])
def test_masked_lm_resize_token_embeddings_resizes_the_output_bias_as_bert(new_size):
    torch.manual_seed(0)
    model = H.HfAttentionForMaskedLM(config()).eval()
    with torch.no_grad():
        model.lm_head.bias.normal_()
    old_bias = model.lm_head.bias.detach().clone()
    bert = BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                      intermediate_size=64)).eval()
    model.resize_token_embeddings(new_size)
    bert.resize_token_embeddings(new_size)
    ids = torch.randint(1, min(new_size, 50), (2, 8))
    logits = model(ids).logits
    assert logits.shape == bert(ids).logits.shape == (2, 8, new_size)
    assert model.lm_head.bias.shape == bert.cls.predictions.bias.shape == (new_size,)
    keep = min(new_size, 50)
    assert torch.equal(model.lm_head.bias[:keep], old_bias[:keep])
    if new_size > 50:  # transformers' mean resizing of an LM-head bias: the mean of the old one
        torch.testing.assert_close(model.lm_head.bias[50:], old_bias.mean().expand(new_size - 50))
    assert model.config.vocab_size == new_size


# ------------------------------------------------------------------------------------ embedding layout (item 9)
@pytest.mark.parametrize("cls", [H.HfAttentionEncoderDecoderModel, H.HfAttentionForConditionalGeneration])
def test_encoder_decoder_without_its_embedding_in_the_checkpoint_reports_it_missing_and_runs(cls, tmp_path):
    _, info = cls.from_pretrained(None, config=config(), state_dict={}, output_loading_info=True)
    prefix = "model." if cls is H.HfAttentionForConditionalGeneration else ""
    model = cls.from_pretrained(None, config=config(), state_dict={})
    assert f"{prefix}shared.weight" in info["missing_keys"]
    assert all(p.device.type != "meta" for p in model.parameters())
    base = getattr(model, "model", model)
    assert base.encoder.embeddings.word_embeddings.weight is base.shared.weight
    assert base.decoder.embeddings.word_embeddings.weight is base.shared.weight
    out = model(input_ids=torch.tensor([[3, 4, 5]]), decoder_input_ids=torch.tensor([[2, 3]]))
    assert torch.isfinite(out[0]).all()

    # A partial checkpoint: every weight but the token table.
    torch.manual_seed(0)
    cls(config()).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights[f"{prefix}shared.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    partial, info = cls.from_pretrained(tmp_path, output_loading_info=True)
    # The table and what is tied to it (both sides' copies, the tied LM head), nothing else.
    assert f"{prefix}shared.weight" in info["missing_keys"]
    assert all(k.endswith(("shared.weight", "word_embeddings.weight", "lm_head.weight")) for k in info["missing_keys"])
    assert all(p.device.type != "meta" for p in partial.parameters())
    out = partial(input_ids=torch.tensor([[3, 4, 5]]), decoder_input_ids=torch.tensor([[2, 3]]))
    assert torch.isfinite(out[0]).all()


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("cls", [H.HfAttentionEncoderDecoderModel, H.HfAttentionForConditionalGeneration])
def test_checkpoints_in_the_previous_layout_load_identically(cls, tie, tmp_path):
    """The previous code shared one module, so its files hold `shared.weight` and neither side's copy (and
    `lm_head.weight` only when untied); such a file, written here by hand, loads to the same model."""
    torch.manual_seed(0)
    model = cls(config(tie_word_embeddings=tie)).eval()
    prefix = "model." if cls is H.HfAttentionForConditionalGeneration else ""
    dropped = {f"{prefix}{side}.embeddings.word_embeddings.weight" for side in ("encoder", "decoder")}
    if tie and prefix:
        dropped.add("lm_head.weight")
    weights = {k: v.contiguous() for k, v in model.state_dict().items() if k not in dropped}
    model.config.save_pretrained(tmp_path)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded, info = cls.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    ids, dec = torch.randint(3, 50, (2, 7)), torch.randint(3, 50, (2, 5))
    assert torch.equal(loaded(input_ids=ids, decoder_input_ids=dec)[0], model(input_ids=ids, decoder_input_ids=dec)[0])
    # And what the code saves now is that same layout.
    model.save_pretrained(tmp_path / "new")
    assert set(load_file(tmp_path / "new" / "model.safetensors")) == set(weights)


# ---------------------------------------------------------------------------------- set_attn_implementation (10)
@pytest.mark.parametrize("name", list(CLASSES))
def test_every_class_switches_its_attention_implementation_after_construction(name):
    torch.manual_seed(0)
    model = CLASSES[name](config(attn_implementation="sdpa")).eval()
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    assert all(m.config._attn_implementation == "eager" for m in model.modules() if hasattr(m, "config"))
    calls = []
    eager = H.scores_hf_attention.eager_attention_forward

    def spy(*args, **kwargs):
        calls.append(1)
        return eager(*args, **kwargs)

    inputs = ({"pixel_values": torch.randn(2, 3, 16, 16)} if FAMILY[name] == "vision"
              else {"input_ids": torch.randint(3, 50, (2, 6))})
    if FAMILY[name] == "seq2seq":
        inputs["decoder_input_ids"] = torch.randint(3, 50, (2, 4))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(H.scores_hf_attention, "eager_attention_forward", spy)
        model(**inputs)
    assert calls, f"{name} did not run the eager kernel after set_attn_implementation('eager')"
    model.set_attn_implementation("sdpa")
    assert model.config._attn_implementation == "sdpa"


# ------------------------------------------------------------------------------------ past_key_values= (item 11)
@pytest.mark.parametrize("cls", [H.HfAttentionForCausalLM, H.HfAttentionDecoder, H.HfAttentionForConditionalGeneration,
                                 H.HfAttentionEncoderDecoderModel])
def test_the_deprecated_past_key_values_name_warns_where_transformers_deprecates_it(cls):
    model = cls(config()).eval()
    inputs = {"input_ids": torch.randint(3, 50, (1, 5)), "use_cache": True}
    if FAMILY[cls.__name__] == "seq2seq":
        inputs["decoder_input_ids"] = torch.randint(3, 50, (1, 3))

    def empty_cache():
        if FAMILY[cls.__name__] == "seq2seq":
            return EncoderDecoderCache(DynamicCache(config=model.config), DynamicCache(config=model.config))
        return DynamicCache(config=model.config)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = model(**inputs, past_key_values=empty_cache())
    deprecation = [w for w in caught if issubclass(w.category, FutureWarning) and "past_key_values" in str(w.message)]
    if CACHE_FIELD == "cache":  # transformers >= 5.24: its own models warn (`@deprecate_kwarg`)
        assert len(deprecation) == 1
    else:
        assert not deprecation
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        new = model(**inputs, **{CACHE_FIELD: empty_cache()} if CACHE_FIELD == "cache" else {})
    assert not [w for w in caught if "past_key_values" in str(w.message)]
    torch.testing.assert_close(old[0], new[0])


def test_saved_config_names_the_class_that_wrote_it(checkpoints):
    """The loader above reads `architectures`; every class writes its own name there."""
    for name, (path, _) in checkpoints.items():
        assert json.loads((path / "config.json").read_text())["architectures"] == [name]
