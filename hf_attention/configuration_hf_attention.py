"""HfAttentionConfig: one config for every attention x positional-encoding variant."""

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig

ATTENTION_TYPES = ("standard", "additive", "rope", "sparse")
POSITION_EMBEDDING_TYPES = ("sinusoidal", "learned", "rope", "alibi", "relative", "none")
SPARSE_PATTERNS = ("local", "strided", "block")
NORM_POSITIONS = ("pre", "post")
POOLING_TYPES = ("cls", "mean")
# Positional types that act on q/k or on the scores, not on the input embeddings.
RELATIVE_POSITION_TYPES = ("rope", "alibi", "relative")
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


def _choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {', '.join(map(repr, choices))}.")


def _positive(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}={value!r} is not valid; it must be a positive integer.")


def _probability(name: str, value: object) -> None:
    if value is not None and not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name}={value!r} is not valid; it must be a probability in [0, 1).")


@strict
class HfAttentionConfig(PreTrainedConfig):
    r"""Configuration of every hf_attention model.

    The scoring algorithm is `attention_type`; the kernel that runs it is transformers'
    `attn_implementation` (`"eager"`, `"sdpa"`, `"flex_attention"`). `attention_type="rope"` is
    standard scoring with rotary q/k and implies `position_embedding_type="rope"`.

    Encoder-decoder models use `encoder_layers` / `decoder_layers` (so transformers' caches size
    themselves); encoder-only models use `num_hidden_layers`.

    Example:
    ```python
    >>> from hf_attention import HfAttentionConfig, HfAttentionModel
    >>> config = HfAttentionConfig(attention_type="sparse", sparse_pattern="local", position_embedding_type="alibi")
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
    scale_embedding: bool = False

    rope_theta: float | int = 10000.0
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    additive_hidden_size: int | None = None

    sparse_pattern: str = "local"
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

    # Vision
    image_size: int = 32
    patch_size: int = 4
    num_channels: int = 3
    pooling: str = "cls"

    def __post_init__(self, **kwargs):
        if self.position_embedding_type is None:
            # RoPE attention implies rotary positions; everything else defaults to BERT-style learned.
            self.position_embedding_type = "rope" if self.attention_type == "rope" else "learned"
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
        self.check_variant()
        self.check_architecture()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate_variant(self):
        """Part of `@strict` validation (`config.validate()` after edits)."""
        self.check_variant()

    def validate_architecture(self):
        """Part of `@strict` validation (`config.validate()` after edits)."""
        self.check_architecture()

    def to_dict(self) -> dict:
        """transformers' `pipeline()` swaps the model class names in `custom_pipelines` for classes in place;
        save names so the config stays JSON (and loadable) after a pipeline was built from it."""
        output = super().to_dict()
        pipelines = output.get("custom_pipelines")
        if pipelines:
            output["custom_pipelines"] = {
                task: {**info, "pt": [c if isinstance(c, str) else c.__name__ for c in info.get("pt", ())]}
                for task, info in pipelines.items()
            }
        return output

    def check_variant(self) -> None:
        """Every bad value raises a ValueError naming itself and the valid choices."""
        _choice("attention_type", self.attention_type, ATTENTION_TYPES)
        _choice("position_embedding_type", self.position_embedding_type, POSITION_EMBEDDING_TYPES)
        _choice("norm_position", self.norm_position, NORM_POSITIONS)
        _choice("pooling", self.pooling, POOLING_TYPES)
        if self.attention_type == "rope" and self.position_embedding_type != "rope":
            raise ValueError(
                f"attention_type='rope' implies position_embedding_type='rope', got "
                f"position_embedding_type={self.position_embedding_type!r}; use attention_type='standard' "
                "with that positional type, or position_embedding_type='rope'."
            )
        if self.attention_type == "sparse":
            _choice("sparse_pattern", self.sparse_pattern, SPARSE_PATTERNS)
        for name in ("sparse_window_size", "sparse_block_size", "sparse_stride"):
            _positive(name, getattr(self, name))
        if self.sparse_num_global_tokens < 0 or self.sparse_num_random_blocks < 0:
            raise ValueError(
                f"sparse_num_global_tokens={self.sparse_num_global_tokens!r} and sparse_num_random_blocks="
                f"{self.sparse_num_random_blocks!r} must be non-negative integers."
            )
        for name in ("relative_attention_num_buckets", "relative_attention_max_distance", "additive_hidden_size",
                     "max_position_embeddings", "num_attention_heads", "hidden_size", "intermediate_size",
                     "image_size", "patch_size", "num_channels", "vocab_size"):
            _positive(name, getattr(self, name))
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "activation_dropout", "classifier_dropout"):
            _probability(name, getattr(self, name))
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta={self.rope_theta!r} is not valid; it must be positive.")

    def check_architecture(self) -> None:
        """Shapes that cannot work."""
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not a multiple of num_attention_heads="
                f"{self.num_attention_heads}."
            )
        if self.position_embedding_type == "rope" and self.head_dim % 2 != 0:
            raise ValueError(f"position_embedding_type='rope' needs an even head dimension, got {self.head_dim}.")
        if self.relative_attention_num_buckets < 2:
            raise ValueError(
                f"relative_attention_num_buckets={self.relative_attention_num_buckets} is too small; use at least 2."
            )
        if self.image_size % self.patch_size != 0:
            raise ValueError(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}.")


__all__ = ["HfAttentionConfig"]
