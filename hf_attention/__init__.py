"""hf_attention: every attention and positional-encoding variant in one Hugging Face model family.

Importing the package registers the config and every model with transformers' Auto classes.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
)

from .configuration_hf_attention import ConfigFieldError, HfAttentionConfig

# The function shadows its module as a package attribute (`hf_attention.convert` is the function); the module
# stays importable by name: `from hf_attention.convert import ConversionReport, main`.
from .convert import convert
from .integration import use_variant  # registers the hf_attention_* attn_implementations
from .modeling_hf_attention import (
    HfAttentionDecoder,
    HfAttentionEncoderDecoderModel,
    HfAttentionForCausalLM,
    HfAttentionForConditionalGeneration,
    HfAttentionForMaskedLM,
    HfAttentionForQuestionAnswering,
    HfAttentionForSequenceClassification,
    HfAttentionModel,
    HfAttentionPreTrainedModel,
)
from .modeling_hf_attention_vision import (
    HfAttentionForImageClassification,
    HfAttentionVisionModel,
    HfAttentionVisionPreTrainedModel,
    make_image_processor,
)

__version__ = "0.1.0"

_AUTO_CLASSES = {
    "AutoModel": (AutoModel, HfAttentionModel),
    "AutoModelForMaskedLM": (AutoModelForMaskedLM, HfAttentionForMaskedLM),
    "AutoModelForSequenceClassification": (AutoModelForSequenceClassification, HfAttentionForSequenceClassification),
    "AutoModelForQuestionAnswering": (AutoModelForQuestionAnswering, HfAttentionForQuestionAnswering),
    "AutoModelForSeq2SeqLM": (AutoModelForSeq2SeqLM, HfAttentionForConditionalGeneration),
    "AutoModelForCausalLM": (AutoModelForCausalLM, HfAttentionForCausalLM),
    "AutoModelForImageClassification": (AutoModelForImageClassification, HfAttentionForImageClassification),
}

AutoConfig.register(HfAttentionConfig.model_type, HfAttentionConfig, exist_ok=True)
HfAttentionConfig.register_for_auto_class()
for _auto_name, (_auto_cls, _model_cls) in _AUTO_CLASSES.items():
    _auto_cls.register(HfAttentionConfig, _model_cls, exist_ok=True)
    _model_cls.register_for_auto_class(_auto_name)

__all__ = [
    "HfAttentionConfig",
    "HfAttentionPreTrainedModel",
    "HfAttentionModel",
    "HfAttentionForMaskedLM",
    "HfAttentionForSequenceClassification",
    "HfAttentionForQuestionAnswering",
    "HfAttentionDecoder",
    "HfAttentionEncoderDecoderModel",
    "HfAttentionForConditionalGeneration",
    "HfAttentionForCausalLM",
    "HfAttentionVisionPreTrainedModel",
    "HfAttentionVisionModel",
    "HfAttentionForImageClassification",
    "make_image_processor",
    "use_variant",
    "convert",
    "ConfigFieldError",
]


def _import_plugins() -> None:
    """Modules named in HF_ATTENTION_PLUGINS (comma-separated) are imported here: a user's own registered
    variants are then known in every process, e.g. the recipes a sweep launches."""
    import importlib
    import os

    for name in filter(None, (part.strip() for part in os.environ.get("HF_ATTENTION_PLUGINS", "").split(","))):
        importlib.import_module(name)


_import_plugins()
