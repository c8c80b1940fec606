"""Checkpoints saved by the release before the three-axes config (commit 5a1b300) load and give its outputs.

The fixtures were written by that release's code (see each folder's README.md): `attention_type="sparse"` and
`"rope"`, and `sparse_pattern="local"` saved next to dense variants (the old default), must keep their meaning.
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel

import hf_attention as H

ROOT = Path(__file__).parent / "fixtures" / "legacy_checkpoints"
CLASSES = {
    "masked_lm_sparse_block_alibi": H.HfAttentionForMaskedLM,
    "causal_lm_rope": H.HfAttentionForCausalLM,
    "seq2seq_additive_relative": H.HfAttentionForConditionalGeneration,
    "seqcls_standard_sinusoidal": H.HfAttentionForSequenceClassification,
    "vision_sparse_local_relative": H.HfAttentionForImageClassification,
    "causal_lm_sparse_strided_learned": H.HfAttentionForCausalLM,
    "vision_additive_learned": H.HfAttentionForImageClassification,
}


def _logits(model, expected: dict) -> torch.Tensor:
    inputs = {k: v for k, v in expected.items() if k != "logits"}
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_legacy_checkpoint_loads_with_identical_outputs(name, tmp_path):
    folder = ROOT / name
    expected = load_file(folder / "expected_outputs.safetensors")
    model, info = CLASSES[name].from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    torch.testing.assert_close(_logits(model.eval(), expected), expected["logits"], rtol=1e-5, atol=1e-5)
    # Saved again by this release, it still loads and gives the same outputs.
    model.save_pretrained(tmp_path)
    again, info = CLASSES[name].from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    torch.testing.assert_close(_logits(again.eval(), expected), expected["logits"], rtol=1e-5, atol=1e-5)


def test_legacy_configs_load_through_auto_classes():
    for name in CLASSES:
        config = AutoConfig.from_pretrained(ROOT / name)
        assert isinstance(config, H.HfAttentionConfig)
    model = AutoModel.from_pretrained(ROOT / "masked_lm_sparse_block_alibi")
    assert isinstance(model, H.HfAttentionModel)
