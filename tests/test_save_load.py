"""save_pretrained / from_pretrained, Auto classes, and remote code without our package."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from test_modeling import tiny_config
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
)

from hf_attention import (
    HfAttentionConfig,
    HfAttentionForMaskedLM,
    HfAttentionForQuestionAnswering,
    HfAttentionForSequenceClassification,
    HfAttentionModel,
)
from hf_attention.variants import covering_variants, variant_name

VARIANTS = covering_variants()  # pairwise cover: every scoring x positions, x patterns
IDS = [variant_name(v["attention_type"], v["position_embedding_type"], v.get("sparse_pattern")) for v in VARIANTS]
HEADS = {
    "AutoModel": HfAttentionModel,
    "AutoModelForMaskedLM": HfAttentionForMaskedLM,
    "AutoModelForSequenceClassification": HfAttentionForSequenceClassification,
    "AutoModelForQuestionAnswering": HfAttentionForQuestionAnswering,
}


def _first_output(out) -> torch.Tensor:
    for name in ("last_hidden_state", "logits", "start_logits"):
        if getattr(out, name, None) is not None:
            return getattr(out, name)
    raise AssertionError(f"no output tensor in {type(out)}")


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_round_trip_is_exact_for_every_variant(variant, tmp_path):
    torch.manual_seed(0)
    model = HfAttentionForMaskedLM(tiny_config(**variant)).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is HfAttentionForMaskedLM
    assert loaded.config.attention_type == variant["attention_type"]
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    ids = torch.randint(1, 50, (2, 24))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    assert torch.equal(model(ids, attention_mask=mask).logits, loaded(ids, attention_mask=mask).logits)
    assert loaded.lm_head.decoder.weight is loaded.model.embeddings.word_embeddings.weight


def test_auto_classes_resolve_every_head(tmp_path):
    config = tiny_config()
    assert type(AutoConfig.for_model("hf_attention")) is HfAttentionConfig
    for auto_name, cls in HEADS.items():
        auto_cls = {"AutoModel": AutoModel, "AutoModelForMaskedLM": AutoModelForMaskedLM,
                    "AutoModelForSequenceClassification": AutoModelForSequenceClassification,
                    "AutoModelForQuestionAnswering": AutoModelForQuestionAnswering}[auto_name]
        assert type(auto_cls.from_config(config)) is cls


def test_saved_config_has_the_full_auto_map(tmp_path):
    HfAttentionForQuestionAnswering(tiny_config()).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    from hf_attention.configuration_hf_attention import AUTO_MAP

    assert set(saved["auto_map"]) == set(AUTO_MAP) >= {"AutoConfig", *HEADS}
    for module_file in ("modeling_hf_attention.py", "configuration_hf_attention.py", "attention_additive.py",
                        "attention_sparse.py", "positions_hf_attention.py"):
        assert (tmp_path / module_file).exists(), module_file


REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["hf_attention"] = None  # the package must not be importable: only the saved code may run
    import importlib, torch, transformers
    try:
        import hf_attention  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("hf_attention was importable")
    folder, auto_name, inputs_path = sys.argv[1:4]
    auto_cls = getattr(transformers, auto_name)
    model = auto_cls.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    data = torch.load(inputs_path)
    with torch.no_grad():
        out = model(data["ids"], attention_mask=data["mask"])
    for name in ("last_hidden_state", "logits", "start_logits"):
        if getattr(out, name, None) is not None:
            torch.save(getattr(out, name), inputs_path + ".out")
            break
    print("loaded", type(model).__name__)
    """
)


@pytest.mark.parametrize(
    "auto_name,variant",
    [
        ("AutoModel", {"attention_type": "sparse", "sparse_pattern": "block", "position_embedding_type": "alibi"}),
        ("AutoModelForMaskedLM", {"attention_type": "additive", "position_embedding_type": "relative"}),
        ("AutoModelForSequenceClassification", {"attention_type": "rope"}),
        ("AutoModelForQuestionAnswering", {"attention_type": "sparse", "sparse_pattern": "strided",
                                           "position_embedding_type": "sinusoidal"}),
    ],
)
def test_remote_code_loads_in_a_fresh_isolated_python(auto_name, variant, tmp_path):
    torch.manual_seed(0)
    model = HEADS[auto_name](tiny_config(**variant)).eval()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    ids = torch.randint(1, 50, (2, 20))
    mask = torch.ones_like(ids)
    mask[0, 14:] = 0
    inputs_path = str(tmp_path / "inputs.pt")
    torch.save({"ids": ids, "mask": mask}, inputs_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HOME"] = str(tmp_path / "hf_home")
    result = subprocess.run(
        [sys.executable, "-I", "-c", REMOTE_SCRIPT, str(folder), auto_name, inputs_path],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"loaded {type(model).__name__}" in result.stdout
    with torch.no_grad():
        expected = _first_output(model(ids, attention_mask=mask))
    torch.testing.assert_close(torch.load(inputs_path + ".out"), expected, rtol=1e-5, atol=1e-6)


def test_push_to_hub_and_load_back_from_a_local_hub(local_hub):
    torch.manual_seed(0)
    model = HfAttentionForSequenceClassification(
        tiny_config(attention_type="sparse", sparse_pattern="local", position_embedding_type="alibi", num_labels=3)
    ).eval()
    model.push_to_hub("researcher/sparse-alibi", token="hf_fake")
    stored = local_hub.files("researcher/sparse-alibi")
    assert {"config.json", "model.safetensors", "modeling_hf_attention.py", "attention_sparse.py"} <= set(stored)
    loaded = AutoModelForSequenceClassification.from_pretrained("researcher/sparse-alibi").eval()
    ids = torch.randint(1, 50, (2, 16))
    assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert local_hub.unknown_routes == []
