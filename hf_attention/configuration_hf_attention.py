"""HfAttentionConfig: one config for every attention x positional-encoding variant."""

import dataclasses
import difflib
from functools import wraps

from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import StrictDataclassClassValidationError, StrictDataclassFieldValidationError
from transformers.activations import ACT2FN
from transformers.configuration_utils import PreTrainedConfig
from transformers.generation.configuration_utils import GenerationConfig

from .registry_hf_attention import attention_score_class, positional_encoding_class, sparse_pattern_class
from .validation_hf_attention import check_choice, check_positive_int, check_probability

NORM_POSITIONS = ("pre", "post")
# The first release's fused spellings of `attention_type` (see `normalise_legacy_variant`).
LEGACY_ATTENTION_TYPES = ("sparse", "rope")
POOLING_TYPES = ("cls", "mean")
# Written by `to_dict`: configs without it were saved before scoring, pattern and positions were three axes.
CONFIG_FORMAT_KEY, CONFIG_FORMAT = "hf_attention_config_format", 2
# Written into every saved config so each head loads with `trust_remote_code=True` without our package.
AUTO_MAP = {
    "AutoConfig": "configuration_hf_attention.HfAttentionConfig",
    "AutoModel": "modeling_hf_attention.HfAttentionModel",
    "AutoModelForMaskedLM": "modeling_hf_attention.HfAttentionForMaskedLM",
    "AutoModelForSequenceClassification": "modeling_hf_attention.HfAttentionForSequenceClassification",
    "AutoModelForQuestionAnswering": "modeling_hf_attention.HfAttentionForQuestionAnswering",
    "AutoModelForSeq2SeqLM": "modeling_hf_attention.HfAttentionForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_hf_attention.HfAttentionForCausalLM",
    "AutoModelForImageClassification": "modeling_hf_attention_vision.HfAttentionForImageClassification",
}
# transformers 5.x removed the summarization and question-answering pipelines; ours ship next to every saved
# model, so `pipeline(task, model=folder, trust_remote_code=True)` keeps working.
CUSTOM_PIPELINES = {
    "summarization": {
        "impl": "pipelines_hf_attention.HfAttentionSummarizationPipeline",
        "pt": ["AutoModelForSeq2SeqLM"],
        "type": "text",
    },
    "question-answering": {
        "impl": "pipelines_hf_attention.HfAttentionQuestionAnsweringPipeline",
        "pt": ["AutoModelForQuestionAnswering"],
        "type": "text",
    },
}


# Prefixes of our own option families: an unknown keyword with one of them is a typo, never a transformers key.
OWN_PREFIXES = ("sparse_", "attention_", "position_")
# Extra keywords transformers itself passes or consumes (besides the dataclass fields); never rejected.
TRANSFORMERS_KWARGS = frozenset({
    "output_attentions", "attn_implementation", "experts_implementation", "torch_dtype", "name_or_path", "num_labels",
    "auto_map", "custom_pipelines", "model_type", "rope_scaling", "per_layer_config",
    "add_cross_attention", "cross_attention_hidden_size", "tie_encoder_decoder", "finetuning_task", "tokenizer_class",
    "prefix", "task_specific_params", "pruned_heads", "torchscript", "use_bfloat16", "tf_legacy_loss",
    "gradient_checkpointing",
})
_TYPO_CUTOFF = 0.85  # difflib ratio: one wrong letter in a 6-letter name is 0.92; transformers' own keys stay below


class ConfigFieldError(StrictDataclassFieldValidationError, ValueError):
    """A field of the wrong type: a ValueError like every other bad value (and still what `@strict` raises)."""

    def __init__(self, field: str, value: object, expected: object):
        expected = getattr(expected, "__name__", None) or str(expected)
        Exception.__init__(self, f"{field}={value!r} is not valid; it must be of type {expected}, "
                                 f"not {type(value).__name__}.")
        self.field = field


class ConfigValidationError(StrictDataclassClassValidationError, ValueError):
    """`config.validate()` failed: a ValueError, as at construction."""

    def __init__(self, message: str):
        Exception.__init__(self, message)


def _raise_value_errors(cls):
    """Make `@strict`'s type errors (on construction and on assignment) and `validate()` raise ValueErrors."""
    strict_setattr, strict_validate = cls.__setattr__, cls.validate

    def __setattr__(self, name, value):
        if name == "attention_type" and self.__dict__.get("_axes_ready"):
            values = normalise_legacy_variant({"attention_type": value,
                                               "position_embedding_type": self.position_embedding_type,
                                               "sparse_pattern": self.sparse_pattern})
            value = values["attention_type"]
            for other in ("position_embedding_type", "sparse_pattern"):
                if values[other] != getattr(self, other):
                    setattr(self, other, values[other])
        try:
            strict_setattr(self, name, value)
        except ConfigFieldError:
            raise
        except StrictDataclassFieldValidationError as error:
            raise ConfigFieldError(name, value, cls.__dataclass_fields__[name].type) from error

    @wraps(strict_validate)
    def validate(self):
        try:
            strict_validate(self)
        except StrictDataclassClassValidationError as error:
            raise ConfigValidationError(str(error.__cause__ or error)) from error

    validate.__is_defined_by_strict_decorator__ = True  # lets remote-code subclasses apply `@strict` again
    cls.__setattr__, cls.validate = __setattr__, validate
    return cls


def normalise_legacy_variant(values: dict, saved_before_axes: bool = False) -> dict:
    """The one place the first release's spellings are read (in place; returns `values`).

    `attention_type` used to fuse three choices: `"sparse"` is standard scoring with `sparse_pattern` (default
    `"local"`), `"rope"` is standard scoring with rotary positions. Configs saved then carried the unused
    default `sparse_pattern="local"` next to dense variants (`saved_before_axes`): it meant dense.
    """
    attention = values.get("attention_type")
    if saved_before_axes and attention != "sparse" and "sparse_pattern" in values:
        values["sparse_pattern"] = None
    if attention == "sparse":
        values["attention_type"] = "standard"
        values["sparse_pattern"] = values.get("sparse_pattern") or "local"
    elif attention == "rope":
        position = values.get("position_embedding_type")
        if position not in (None, "rope"):
            raise ValueError(
                f"attention_type='rope' implies position_embedding_type='rope', got "
                f"position_embedding_type={position!r}; use attention_type='standard' "
                "with that positional type, or position_embedding_type='rope'."
            )
        values["attention_type"] = "standard"
        values["position_embedding_type"] = "rope"
    return values


@_raise_value_errors
@strict
class HfAttentionConfig(PreTrainedConfig):
    r"""Configuration of every hf_attention model.

    Three independent axes, each a registry of classes: the scoring function `attention_type`
    (`ATTENTION_SCORES`), the sparse pattern `sparse_pattern` (None = dense, or `SPARSE_PATTERN_CLASSES`) and
    `position_embedding_type` (`POSITIONAL_ENCODINGS`); combinations that cannot work are refused with the
    reason. The kernel that runs the scoring is transformers' `attn_implementation` (`"eager"`, `"sdpa"`,
    `"flex_attention"`). The first release's `attention_type="sparse"` / `"rope"` still load
    (`normalise_legacy_variant`).

    Encoder-decoder models use `encoder_layers` / `decoder_layers` (so transformers' caches size
    themselves); encoder-only models use `num_hidden_layers`.

    Every bad value raises a `ValueError` naming the field and what it accepts, wrong types included
    (`ConfigFieldError`, a `ValueError`): at construction, on assignment (types), and again, for every
    value, when a model is built from the config (`config.check()`), so values changed after construction
    or passed to `from_pretrained` are checked before any weight exists. An unknown keyword that looks
    like one of ours (close to a field name, or a `sparse_*` / `attention_*` / `position_*` name that is
    not a field) raises with a "did you mean"; other extra keywords are kept, as transformers does.

    Example:
    ```python
    >>> from hf_attention import HfAttentionConfig, HfAttentionModel
    >>> config = HfAttentionConfig(attention_type="standard", sparse_pattern="local", position_embedding_type="rope")
    >>> model = HfAttentionModel(config)
    ```
    """

    model_type = "hf_attention"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]  # 5.24+ name, older name

    vocab_size: int = 30522
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 1024
    hidden_act: str = "gelu"
    hidden_dropout_prob: float | int = 0.1
    attention_probs_dropout_prob: float | int = 0.1
    activation_dropout: float | int = 0.0  # inside the MLP, after the activation (BART's; BERT and ViT have none)
    classifier_dropout: float | int | None = None
    layer_norm_eps: float = 1e-12
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    pad_token_id: int | None = 0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    tie_word_embeddings: bool = True
    use_cache: bool = True

    attention_type: str = "standard"
    position_embedding_type: str | None = None
    norm_position: str = "post"
    attention_bias: bool = True
    # None: follow the positional type (Vaswani et al. scale token embeddings by sqrt(hidden_size) under sinusoidal
    # positions, whose unit amplitude otherwise swamps embeddings initialised at std 0.02); saved configs keep theirs.
    scale_embedding: bool | None = None

    rope_theta: float | int = 10000.0
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    additive_hidden_size: int | None = None
    gaussian_bandwidth: float | int | None = None  # attention_type="gaussian": None learns sigma per head
    linear_feature_map: str = "elu"  # attention_type="linear": phi, one of attention_linear.FEATURE_MAPS

    sparse_pattern: str | None = None  # None: dense attention
    sparse_window_size: int = 128
    sparse_block_size: int = 64
    sparse_stride: int = 64
    sparse_num_global_tokens: int = 1
    sparse_num_random_blocks: int = 1
    sparse_seed: int = 0

    # Encoder-decoder / decoder sizes (None: same as the encoder-only fields).
    encoder_layers: int | None = None
    decoder_layers: int | None = None
    decoder_start_token_id: int | None = None
    is_encoder_decoder: bool = False
    is_decoder: bool = False  # a decoder-only (causal) model; HfAttentionForCausalLM sets it

    # Vision
    image_size: int = 32
    patch_size: int = 4
    num_channels: int = 3
    pooling: str = "cls"

    def __post_init__(self, **kwargs):
        sliding_window = kwargs.pop("sliding_window", None)
        _check_unknown_kwargs(kwargs)
        if sliding_window is not None:
            self.sliding_window = sliding_window
        legacy = normalise_legacy_variant({"attention_type": self.attention_type, "sparse_pattern": self.sparse_pattern,
                                           "position_embedding_type": self.position_embedding_type})
        self.attention_type, self.sparse_pattern = legacy["attention_type"], legacy["sparse_pattern"]
        self.position_embedding_type = legacy["position_embedding_type"] or "learned"  # BERT's default
        if self.scale_embedding is None:
            self.scale_embedding = positional_encoding_class(self.position_embedding_type).scales_embedding
        if self.additive_hidden_size is None and self.num_attention_heads:
            self.additive_hidden_size = self.hidden_size // max(self.num_attention_heads, 1)
        if self.encoder_layers is None:
            self.encoder_layers = self.num_hidden_layers
        if self.decoder_layers is None:
            self.decoder_layers = self.num_hidden_layers
        super().__post_init__(**kwargs)
        self.auto_map = {**AUTO_MAP, **(getattr(self, "auto_map", None) or {})}
        self.custom_pipelines = {**CUSTOM_PIPELINES, **(getattr(self, "custom_pipelines", None) or {})}
        # `@strict` wraps validator errors in a non-ValueError; users (and recipes) catch ValueError.
        self.check()
        self.__dict__["_axes_ready"] = True  # later `attention_type` assignments are normalised too

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def sliding_window(self) -> int | None:
        """transformers' `sliding_window`, for tools that read it: set exactly where our pattern is that convention.

        Mistral's convention (`masking_utils.sliding_window_overlay` on a causal mask): query i sees key j iff
        `0 <= i - j < sliding_window`, i.e. the `sliding_window` most recent keys, itself included. That is our
        causal `local` pattern with `sparse_window_size`, so this is `sparse_window_size` for a decoder-only
        (`is_decoder=True`, set by `HfAttentionForCausalLM`) sparse-local model and None otherwise: a
        bidirectional encoder's window is `|i - j| <= sparse_window_size // 2` (another pattern), and an
        encoder-decoder's cross-attention cache is built from this same config (a window would truncate it).
        Derived, so it cannot disagree with `sparse_window_size`. Setting it (as transformers' common tests and
        tools do) selects what it names: `N` gives `sparse_pattern="local"`,
        `sparse_window_size=N` (exactly transformers' sliding window in a decoder; in an encoder our bidirectional
        local window of that size, for which this property then reads None); `None` turns a local pattern back
        into dense attention.
        """
        if self.sparse_pattern == "local" and self.is_decoder:
            return self.sparse_window_size
        return None

    @sliding_window.setter
    def sliding_window(self, value: int | None) -> None:
        if value is None:
            if self.sparse_pattern == "local":
                self.sparse_pattern = None
            return
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"sliding_window={value!r} is not valid; it must be a positive integer or None.")
        self.sparse_pattern = "local"
        self.sparse_window_size = value

    @property
    def layer_types(self) -> list[str] | None:
        """Every layer `"full_attention"` when `sliding_window` is set, so transformers' caches keep every key.

        Without it `DynamicCache(config=...)` (also what `generate()` builds) infers sliding-window layers from
        `sliding_window` and keeps only the last `sliding_window - 1` keys, while our decoder addresses cached
        keys by absolute position and applies the window itself. None otherwise (transformers' default).
        """
        return ["full_attention"] * self.num_hidden_layers if self.sliding_window is not None else None

    def check(self) -> None:
        """Validate every value (raises ValueError); every model runs it on the config it is built from."""
        self.check_variant()
        self.check_architecture()

    def validate_variant(self):
        """Part of `@strict` validation (`config.validate()` after edits)."""
        self.check_variant()

    def validate_architecture(self):
        """Part of `@strict` validation (`config.validate()` after edits)."""
        self.check_architecture()

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """Saved configs: those without the format key were written before the three axes (see
        `normalise_legacy_variant`); `from_pretrained` keyword overrides are normalised on assignment."""
        config_dict = dict(config_dict)
        saved_before_axes = config_dict.pop(CONFIG_FORMAT_KEY, None) is None
        return super().from_dict(normalise_legacy_variant(config_dict, saved_before_axes), **kwargs)

    def to_dict(self) -> dict:
        """transformers' `pipeline()` swaps the model class names in `custom_pipelines` for classes in place;
        save names so the config stays JSON (and loadable) after a pipeline was built from it."""
        output = super().to_dict()
        output[CONFIG_FORMAT_KEY] = CONFIG_FORMAT
        output.pop("_axes_ready", None)
        pipelines = output.get("custom_pipelines")
        if pipelines:
            output["custom_pipelines"] = {
                task: {**info, "pt": [c if isinstance(c, str) else c.__name__ for c in info.get("pt", ())]}
                for task, info in pipelines.items()
            }
        return output

    def check_variant(self) -> None:
        """Every bad value raises a ValueError naming itself and the valid choices."""
        score = attention_score_class(self.attention_type)
        positions = positional_encoding_class(self.position_embedding_type)
        if self.sparse_pattern is not None:
            sparse_pattern_class(self.sparse_pattern)
        check_choice("norm_position", self.norm_position, NORM_POSITIONS)
        check_choice("pooling", self.pooling, POOLING_TYPES)
        if self.hidden_act not in ACT2FN:
            raise ValueError(
                f"hidden_act={self.hidden_act!r} is not valid; choose one of transformers' activations: "
                f"{', '.join(map(repr, sorted(ACT2FN)))}."
            )
        for name in ("sparse_window_size", "sparse_block_size", "sparse_stride"):
            check_positive_int(name, getattr(self, name))
        if self.sparse_num_global_tokens < 0 or self.sparse_num_random_blocks < 0:
            raise ValueError(
                f"sparse_num_global_tokens={self.sparse_num_global_tokens!r} and sparse_num_random_blocks="
                f"{self.sparse_num_random_blocks!r} must be non-negative integers."
            )
        # Sizes first: additive_hidden_size is derived from them (hidden_size // num_attention_heads).
        for name in ("num_attention_heads", "hidden_size", "intermediate_size", "vocab_size",
                     "max_position_embeddings", "relative_attention_num_buckets", "relative_attention_max_distance",
                     "image_size", "patch_size", "num_channels", "additive_hidden_size"):
            check_positive_int(name, getattr(self, name))
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "activation_dropout", "classifier_dropout"):
            check_probability(name, getattr(self, name))
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta={self.rope_theta!r} is not valid; it must be positive.")
        positions.check_config(self)
        score.check_config(self)

    def check_architecture(self) -> None:
        """Shapes that cannot work."""
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not a multiple of num_attention_heads="
                f"{self.num_attention_heads}."
            )
        if self.image_size % self.patch_size != 0:
            raise ValueError(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}.")


# Fields this class declares (transformers' own are not typos of ours).
_BASE_FIELDS = {f.name for f in dataclasses.fields(PreTrainedConfig)}
OWN_FIELDS = tuple(f.name for f in dataclasses.fields(HfAttentionConfig) if f.name not in _BASE_FIELDS)


def _check_unknown_kwargs(kwargs: dict) -> None:
    """Reject extra keywords that look like ours; keep the rest (transformers passes many, old configs hold more).

    Drops `layer_types=None` in place (a derived property, which cannot be assigned).
    """
    allowed = TRANSFORMERS_KWARGS | set(GenerationConfig._get_default_generation_params())
    if "layer_types" in kwargs and kwargs["layer_types"] is None:
        del kwargs["layer_types"]  # what the derived property says anyway (it has no setter)
    for key in kwargs:
        if key == "layer_types":
            raise ValueError(
                f"layer_types={kwargs[key]!r}: layer_types is derived from the sparse pattern, not set; use "
                "sparse_pattern='local', sparse_window_size=N (or sliding_window=N)."
            )
        if key.startswith("_") or key in allowed or key.endswith("_token_id"):
            continue
        close = difflib.get_close_matches(key, OWN_FIELDS, n=1, cutoff=_TYPO_CUTOFF)
        if close or key.startswith(OWN_PREFIXES):
            close = close or difflib.get_close_matches(key, OWN_FIELDS, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else "."
            raise ValueError(f"{key!r} is not an HfAttentionConfig field{hint}")


__all__ = ["ConfigFieldError", "HfAttentionConfig"]
