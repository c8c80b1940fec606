"""hf_attention: every attention and positional-encoding variant in one Hugging Face model family.

Importing the package registers the config and every model with transformers' Auto classes.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
)

from .configuration_hf_attention import HfAttentionConfig
from .modeling_hf_attention import (
    HfAttentionForMaskedLM,
    HfAttentionForQuestionAnswering,
    HfAttentionForSequenceClassification,
    HfAttentionModel,
    HfAttentionPreTrainedModel,
)

__version__ = "0.1.0"

_AUTO_CLASSES = {
    "AutoModel": (AutoModel, HfAttentionModel),
    "AutoModelForMaskedLM": (AutoModelForMaskedLM, HfAttentionForMaskedLM),
    "AutoModelForSequenceClassification": (AutoModelForSequenceClassification, HfAttentionForSequenceClassification),
    "AutoModelForQuestionAnswering": (AutoModelForQuestionAnswering, HfAttentionForQuestionAnswering),
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
]
