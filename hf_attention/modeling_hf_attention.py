"""hf_attention models: one transformer family whose attention and positional encoding are chosen by config.

Data flow: ids -> embeddings (absolute positions added here) -> layers (norm -> attention: projections,
rotary q/k or score bias, sparse pattern, scoring, kernel -> residual -> norm -> MLP) -> head.
The scoring algorithm is `config.attention_type`; the kernel is `config._attn_implementation`.
"""

import copy
import dataclasses
import re
import shutil
from pathlib import Path

import torch
from torch import nn
from torch.nn import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.core_model_loading import WeightRenaming
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutput,
    BaseModelOutputWithPastAndCrossAttentions,
    CausalLMOutputWithPast,
    MaskedLMOutput,
    QuestionAnsweringModelOutput,
    Seq2SeqLMOutput,
    Seq2SeqModelOutput,
    SequenceClassifierOutput,
)
from transformers.modeling_utils import PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple, logging
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .attention_sparse import pattern_from_config
from .cache_names import cache_field, output_cache, resolve_cache
from .configuration_hf_attention import HfAttentionConfig
from .positions_hf_attention import apply_rotary, positional_encoding_class
from .scores_hf_attention import AttentionInputs, AttentionScore, attention_score_class


class HfAttentionAttention(nn.Module):
    """Multi-head attention: project, rotate, cache, score (`config.attention_type`), output projection.

    Self-attention when `is_cross_attention` is False; cross-attention reads keys/values from the
    encoder states and caches them once per generation.
    """

    def __init__(
        self, config: HfAttentionConfig, layer_idx: int | None = None, is_causal: bool = False,
        is_cross_attention: bool = False,
    ):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.is_causal = is_causal
        self.is_cross_attention = is_cross_attention
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.attention_type = config.attention_type
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=bias)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=bias)
        self.score = attention_score_class(config.attention_type)(config)

    @property
    def scaling(self) -> float:
        return self.score.scaling

    def _shape(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], -1, self.head_dim).transpose(1, 2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        inputs: AttentionInputs,
        key_value_states: torch.Tensor | None = None,
        cache: Cache | None = None,
        output_attentions: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, q_len, _ = hidden_states.shape
        query = self._shape(self.q_proj(hidden_states))
        if self.is_cross_attention:
            key, value = self._cross_keys_values(key_value_states, cache)
        else:
            key = self._shape(self.k_proj(hidden_states))
            value = self._shape(self.v_proj(hidden_states))
            if inputs.rotary is not None and not self.score.rotates_itself:
                query = apply_rotary(query, *inputs.rotary)
                key = apply_rotary(key, *inputs.rotary_keys)
            if isinstance(cache, EncoderDecoderCache):
                cache = cache.self_attention_cache
            if cache is not None and self.score.keeps_kv_cache:
                key, value = cache.update(key, value, self.layer_idx)
                cache = None
        dropout = self.config.attention_probs_dropout_prob if self.training else 0.0
        out, weights = self.score(self, query, key, value, inputs, dropout=dropout, output_attentions=output_attentions,
                                  cache=None if self.is_cross_attention else cache)
        out = out.reshape(batch, q_len, -1).contiguous()
        return self.out_proj(out), (weights if output_attentions else None)

    def _cross_keys_values(self, key_value_states: torch.Tensor, cache: Cache | None):
        """Encoder keys/values, projected once per generation and then read from the cross-attention cache."""
        full_cache = cache
        if isinstance(cache, EncoderDecoderCache):
            cache = cache.cross_attention_cache
        is_updated = isinstance(full_cache, EncoderDecoderCache) and full_cache.is_updated.get(self.layer_idx)
        if cache is not None and is_updated:
            return cache.layers[self.layer_idx].keys, cache.layers[self.layer_idx].values
        key = self._shape(self.k_proj(key_value_states))
        value = self._shape(self.v_proj(key_value_states))
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
            full_cache.is_updated[self.layer_idx] = True
        return key, value


class HfAttentionMLP(nn.Module):
    def __init__(self, config: HfAttentionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.activation_fn = ACT2FN[config.hidden_act]
        self.dropout = nn.Dropout(config.activation_dropout)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(self.activation_fn(self.fc1(hidden_states))))


class HfAttentionLayer(GradientCheckpointingLayer):
    """Pre-norm (x + f(norm(x))) or post-norm (norm(x + f(x))) block; decoders add cross-attention."""

    def __init__(self, config: HfAttentionConfig, layer_idx: int, is_decoder: bool = False,
                 add_cross_attention: bool = False):
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.self_attn = HfAttentionAttention(config, layer_idx, is_causal=is_decoder)
        self.self_attn_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder_attn = None
        if add_cross_attention:
            self.encoder_attn = HfAttentionAttention(config, layer_idx, is_cross_attention=True)
            self.encoder_attn_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = HfAttentionMLP(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def _residual(self, hidden_states, norm: nn.LayerNorm, fn) -> torch.Tensor:
        if self.pre_norm:
            return hidden_states + self.dropout(fn(norm(hidden_states)))
        return norm(hidden_states + self.dropout(fn(hidden_states)))

    def forward(
        self,
        hidden_states: torch.Tensor,
        inputs: AttentionInputs,
        encoder_hidden_states: torch.Tensor | None = None,
        cross_inputs: AttentionInputs | None = None,
        cache: Cache | None = None,
        output_attentions: bool = False,
        **kwargs,
    ) -> torch.Tensor:
        hidden_states = self._residual(
            hidden_states, self.self_attn_layer_norm,
            lambda x: self.self_attn(x, inputs, cache=cache,
                                     output_attentions=output_attentions)[0],
        )
        if self.encoder_attn is not None and encoder_hidden_states is not None:
            hidden_states = self._residual(
                hidden_states, self.encoder_attn_layer_norm,
                lambda x: self.encoder_attn(x, cross_inputs, key_value_states=encoder_hidden_states,
                                            cache=cache,
                                            output_attentions=output_attentions)[0],
            )
        return self._residual(hidden_states, self.final_layer_norm, self.mlp)


logger = logging.get_logger(__name__)

# One model_type serves four stacks; a checkpoint's saved `architectures` tells which one wrote it.
FAMILIES = {
    "encoder": ("HfAttentionModel", "HfAttentionForMaskedLM", "HfAttentionForSequenceClassification",
                "HfAttentionForQuestionAnswering"),
    "decoder": ("HfAttentionDecoder", "HfAttentionForCausalLM"),
    "seq2seq": ("HfAttentionEncoderDecoderModel", "HfAttentionForConditionalGeneration"),
    "vision": ("HfAttentionVisionModel", "HfAttentionForImageClassification"),
}
_FAMILY_OF = {name: family for family, names in FAMILIES.items() for name in names}
_FAMILY_TEXT = {"encoder": "a text encoder", "decoder": "a decoder-only language model",
                "seq2seq": "an encoder-decoder", "vision": "a vision encoder"}


# Checkpoints saved before the three-axes config (scoring, pattern, positions as separate objects) keep loading:
# the scoring parameters now live in `*.score`, the stack's score-bias encoding in `score_bias`, and the vision
# table is a module with a `weight`. Applied on load only; saving writes the current layout.
LEGACY_KEY_RENAMINGS = (
    (r"(^|\.)position_bias\.relative_attention_bias\.weight$", r"\1score_bias.relative_attention_bias.weight"),
    (r"\.additive_(w_q|w_k|b|v)$", r".score.\1"),
    (r"(^|\.)embeddings\.position_embeddings$", r"\1embeddings.position_embeddings.weight"),
)


def model_family(cls: type) -> str | None:
    """The stack a class (or a subclass of ours) is built on."""
    return next((_FAMILY_OF[k.__name__] for k in cls.__mro__ if k.__name__ in _FAMILY_OF), None)


def _checkpoint_family(config, keys: set[str] | None) -> tuple[str | None, str | None]:
    """(family, class name) of the class that saved a checkpoint: its `architectures`, else its key layout."""
    for name in getattr(config, "architectures", None) or ():
        if name in _FAMILY_OF:
            return _FAMILY_OF[name], name
    if keys:
        if any(re.match(r"(model\.)?(shared\.weight$|encoder\.|decoder\.)", key) for key in keys):
            return "seq2seq", None
        if any("patch_embeddings." in key for key in keys):
            return "vision", None
    return None, None


def _checkpoint_keys(state_dict: dict | None, checkpoint_files: list[str] | None) -> set[str] | None:
    if state_dict is not None:
        return set(state_dict)
    if not checkpoint_files or not all(str(f).endswith(".safetensors") for f in checkpoint_files):
        return None
    from safetensors import safe_open

    keys = set()
    for file in checkpoint_files:
        with safe_open(file, "pt") as f:
            keys.update(f.keys())
    return keys


def cross_family_renamings(source: str, source_class: str | None, target: str) -> list[tuple[str, str]]:
    """Checkpoint-key renamings that carry one family's weights into another's stack (transformers then adds or
    strips `base_model_prefix` as between BART heads). Empty when nothing applies.

    - encoder-decoder -> encoder / decoder family: that side's stack, `shared` as its token table (the other
      side and the LM head are unused, as BartForCausalLM uses BART's decoder);
    - encoder / decoder family -> encoder-decoder: that side (warm start; the other side is initialised).
    """
    if source == "seq2seq" and target in ("encoder", "decoder"):
        return [(rf"^(?:model\.)?{target}\.(.+)$", r"\1"),
                (r"^(?:model\.)?shared\.weight$", "embeddings.word_embeddings.weight")]
    if source in ("encoder", "decoder") and target == "seq2seq":
        is_head = source_class is None or source_class not in ("HfAttentionModel", "HfAttentionDecoder")
        return [((r"^model\.(.+)$" if is_head else r"^(.+)$"), source + r".\1"),
                (rf"^{source}\.embeddings\.word_embeddings\.weight$", "shared.weight")]
    return []


def _incompatible_message(source: str, source_class: str | None, target: str, target_class: str) -> str:
    what = f"an {source_class}" if source_class else "a model"
    classes = ", ".join(FAMILIES[source])
    hint = ""
    if source in ("encoder", "decoder"):
        hint = " (or warm-start HfAttentionEncoderDecoderModel / HfAttentionForConditionalGeneration from it)"
    return (f"This checkpoint holds {what}, {_FAMILY_TEXT[source]}; {target_class} is "
            f"{_FAMILY_TEXT[target]} and cannot use its weights. Load it with one of "
            f"{classes}{hint}.")


class HfAttentionPreTrainedModel(PreTrainedModel):
    config: HfAttentionConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HfAttentionLayer"]
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_record_outputs = {
        "hidden_states": HfAttentionLayer,
        "attentions": HfAttentionAttention,
    }

    def __init__(self, config: HfAttentionConfig, *inputs, **kwargs):
        # Values set after construction or passed to from_pretrained were never checked: fail before any weight.
        config.check()
        super().__init__(config, *inputs, **kwargs)

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        """Every class can switch kernels after construction: `HfAttentionAttention` reads
        `config._attn_implementation` at each forward (transformers' source heuristic misreads the vision module,
        whose `HfAttention*(nn.Module)` embedding classes look like attention classes to it)."""
        return True

    @staticmethod
    def _load_pretrained_model(model, state_dict, checkpoint_files, load_config, expected_keys=None):
        """Load a checkpoint of another of our stacks: map the weights that apply, or refuse naming the right class.

        One model_type serves four stacks under one `base_model_prefix`, so transformers alone would load an
        encoder-decoder checkpoint into the encoder with every weight missing (only a log line).
        """
        target = model_family(type(model))
        keys = _checkpoint_keys(state_dict, checkpoint_files)
        source, source_class = _checkpoint_family(model.config, keys)
        added: list[WeightRenaming] = []
        if target is not None and source is not None and source != target:
            pairs = cross_family_renamings(source, source_class, target)
            if not pairs:
                raise ValueError(_incompatible_message(source, source_class, target, type(model).__name__))
            added = [WeightRenaming(source_patterns=src, target_patterns=dst) for src, dst in pairs]
            mapping = added + list(load_config.weight_mapping or [])
            load_config = dataclasses.replace(load_config, weight_mapping=mapping)
            part = target if source == "seq2seq" else source
            logger.warning(
                f"{type(model).__name__} takes the {part} weights of this {source_class or source} checkpoint "
                f"({_FAMILY_TEXT[source]}); the rest is not used or initialised. Load it with one of "
                f"{', '.join(FAMILIES[source])} for the whole model."
            )
        legacy = [WeightRenaming(source_patterns=src, target_patterns=dst) for src, dst in LEGACY_KEY_RENAMINGS
                  if keys is None or any(re.search(src, key) for key in keys)]
        if legacy:
            added += legacy
            mapping = legacy + list(load_config.weight_mapping or [])
            load_config = dataclasses.replace(load_config, weight_mapping=mapping)
        result = PreTrainedModel._load_pretrained_model(model, state_dict, checkpoint_files, load_config, expected_keys)
        if added:  # saving must not undo the mapping: the model is now a checkpoint of its own layout
            model._weight_conversions = [c for c in getattr(model, "_weight_conversions", []) or []
                                         if not any(c is a for a in added)]
        return result

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Also ship our pipelines module: transformers copies only the modeling code and its imports."""
        super().save_pretrained(save_directory, *args, **kwargs)
        pipelines_file = Path(__file__).with_name("pipelines_hf_attention.py")
        if self._auto_class is not None and pipelines_file.exists() and Path(save_directory).is_dir():
            shutil.copy(pipelines_file, Path(save_directory) / pipelines_file.name)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, AttentionScore):
            module.init_weights(self.config)
        elif isinstance(module, HfAttentionLMHead):
            init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)


def _expand_positions(position_ids: torch.Tensor | None, length: int, offset: int, device) -> torch.Tensor:
    if position_ids is None:
        return (torch.arange(length, device=device) + offset).unsqueeze(0)
    if position_ids.is_floating_point() or position_ids.is_complex() or position_ids.dtype == torch.bool:
        raise ValueError(f"position_ids must hold integers, got dtype {position_ids.dtype}.")
    if position_ids.dim() not in (1, 2) or position_ids.shape[-1] != length:
        raise ValueError(
            f"position_ids has shape {tuple(position_ids.shape)}; expected (batch_size, {length}) or ({length},) "
            f"for {length} new tokens."
        )
    if position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0)
    return position_ids


class HfAttentionEmbeddings(nn.Module):
    """Token (+ token type) (+ absolute position) embeddings; post-norm models normalise here as BERT does."""

    def __init__(self, config: HfAttentionConfig, use_token_types: bool = True):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.token_type_embeddings = (
            nn.Embedding(config.type_vocab_size, config.hidden_size)
            if use_token_types and config.type_vocab_size > 0
            else None
        )
        positions = positional_encoding_class(config.position_embedding_type)
        self.position_embeddings = positions.from_config(config) if positions.adds_to_embeddings else None
        self.embed_scale = config.hidden_size**0.5 if config.scale_embedding else 1.0
        self.layer_norm = (
            nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.norm_position == "post" else None
        )
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        position_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        batch_size = inputs_embeds.shape[0]
        if position_ids.shape[0] not in (1, batch_size):
            raise ValueError(
                f"position_ids has batch size {position_ids.shape[0]} but the input has {batch_size}; give one row "
                "per sequence, or a single row shared by the batch."
            )
        embeddings = inputs_embeds * self.embed_scale
        if self.token_type_embeddings is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros(embeddings.shape[:2], dtype=torch.long, device=embeddings.device)
            embeddings = embeddings + self.token_type_embeddings(token_type_ids)
        if self.position_embeddings is not None:
            embeddings = embeddings + self.position_embeddings.embedding(position_ids).to(embeddings.dtype)
        if self.layer_norm is not None:
            embeddings = self.layer_norm(embeddings)
        return self.dropout(embeddings)


def _check_mask_batch(name: str, mask: torch.Tensor, batch_size: int | None) -> None:
    """A mask of another batch size would broadcast silently (a batch-1 mask applied to every row)."""
    if batch_size is not None and mask.shape[0] != batch_size:
        raise ValueError(
            f"{name} has batch size {mask.shape[0]} but the input has batch size {batch_size}; pass one "
            f"[batch, length] mask row per sequence."
        )


def _checkpointing(stack: nn.Module) -> bool:
    """Whether the stack's layers run under gradient checkpointing (GradientCheckpointingLayer's rule)."""
    return stack.training and any(getattr(layer, "gradient_checkpointing", False) for layer in stack.layers)


class HfAttentionStackMixin:
    """Shared by the encoder, decoder and vision stacks: the per-forward AttentionInputs and the layer loop."""

    def _run_layers(self, hidden_states: torch.Tensor, inputs: AttentionInputs, *layer_args, **layer_kwargs
                    ) -> torch.Tensor:
        """Every layer, then the final LayerNorm of a pre-norm stack.

        Tensors that need gradients (encoder states) go in `layer_args`: reentrant checkpointing tracks positional
        tensors only."""
        output_attentions = layer_kwargs.pop("output_attentions", None)
        output_attentions = bool(self.config.output_attentions if output_attentions is None else output_attentions)
        for layer in self.layers:
            hidden_states = layer(hidden_states, inputs, *layer_args, output_attentions=output_attentions,
                                  **layer_kwargs)
        if self.final_layer_norm is not None:
            hidden_states = self.final_layer_norm(hidden_states)
        return hidden_states

    def _build_positional(self, config: HfAttentionConfig, bidirectional: bool) -> None:
        """The stack's share of the variant: a rotary or score-bias encoding (absolute ones live in the
        embeddings) and the sparse pattern."""
        positions = positional_encoding_class(config.position_embedding_type)
        encoding = None if positions.adds_to_embeddings else positions.from_config(config, bidirectional)
        self.rotary_emb = encoding if positions.rotates_queries_and_keys else None
        self.score_bias = encoding if positions.provides_score_bias else None
        self.sparse_pattern = pattern_from_config(config)

    def _attention_inputs(
        self,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dtype: torch.dtype,
        causal: bool = False,
        past_length: int = 0,
        batch_size: int | None = None,
    ) -> AttentionInputs:
        q_len = position_ids.shape[-1]
        k_len = past_length + q_len
        if past_length:
            # Keys of earlier steps: contiguous positions ending where the queries start.
            k_positions = position_ids[:, :1] - past_length + torch.arange(k_len, device=position_ids.device)
        else:
            k_positions = position_ids
        key_padding_mask = None
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError(
                    f"attention_mask must be a 2-D [batch, key_length] padding mask, got shape "
                    f"{tuple(attention_mask.shape)}."
                )
            if attention_mask.shape[-1] != k_len:
                raise ValueError(
                    f"attention_mask has {attention_mask.shape[-1]} positions but the keys have {k_len} "
                    f"(past {past_length} + new {q_len})."
                )
            _check_mask_batch("attention_mask", attention_mask, batch_size)
            if not bool(attention_mask.all()):
                key_padding_mask = attention_mask.to(torch.bool)
        rotary = self.rotary_emb.rotary_tables(position_ids) if self.rotary_emb is not None else None
        return AttentionInputs(
            q_positions=position_ids,
            k_positions=k_positions,
            key_padding_mask=key_padding_mask,
            causal=causal,
            q_offset=past_length,
            rotary=rotary,
            rotary_keys=rotary,
            positions=self.score_bias,
            pattern=self.sparse_pattern,
            share_bias=not _checkpointing(self),
        )


class HfAttentionModel(HfAttentionStackMixin, HfAttentionPreTrainedModel):
    """The encoder: bidirectional self-attention over token ids (or `inputs_embeds`)."""

    def __init__(self, config: HfAttentionConfig, num_layers: int | None = None):
        super().__init__(config)
        num_layers = num_layers if num_layers is not None else config.num_hidden_layers
        self.embeddings = HfAttentionEmbeddings(config)
        self.layers = nn.ModuleList([HfAttentionLayer(config, i) for i in range(num_layers)])
        self.final_layer_norm = (
            nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.norm_position == "pre" else None
        )
        self._build_positional(config, bidirectional=True)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutput:
        r"""
        attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
            1 for real tokens, 0 for padding.
        position_ids (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
            Positions of the tokens (default `0..L-1`). RoPE, ALiBi and relative bias depend only on differences.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Specify exactly one of input_ids or inputs_embeds.")
        reference = input_ids if input_ids is not None else inputs_embeds
        seq_len = reference.shape[1]
        position_ids = _expand_positions(position_ids, seq_len, 0, reference.device)
        hidden_states = self.embeddings(input_ids, position_ids, token_type_ids, inputs_embeds)
        inputs = self._attention_inputs(
            position_ids, attention_mask, hidden_states.dtype, batch_size=reference.shape[0]
        )
        hidden_states = self._run_layers(hidden_states, inputs, output_attentions=kwargs.get("output_attentions"))
        return BaseModelOutput(last_hidden_state=hidden_states)


class HfAttentionLMHead(nn.Module):
    """BERT's prediction head (dense -> act -> norm -> decoder), so BERT MLM weights convert one to one."""

    def __init__(self, config: HfAttentionConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation_fn = ACT2FN[config.hidden_act]
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.layer_norm(self.activation_fn(self.dense(hidden_states)))
        return self.decoder(hidden_states) + self.bias


class HfAttentionForMaskedLM(HfAttentionPreTrainedModel):
    _tied_weights_keys = {"lm_head.decoder.weight": "model.embeddings.word_embeddings.weight"}

    def __init__(self, config: HfAttentionConfig):
        super().__init__(config)
        self.model = HfAttentionModel(config)
        self.lm_head = HfAttentionLMHead(config)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head.decoder

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head.decoder = new_embeddings

    def resize_token_embeddings(
        self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None, mean_resizing: bool = True
    ) -> nn.Embedding:
        """Also resizes `lm_head.bias` (transformers resizes only the decoder; BERT ties its bias to it)."""
        embeddings = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        old_bias, size = self.lm_head.bias, embeddings.weight.shape[0]
        if old_bias.shape[0] != size:
            new_bias = old_bias.new_zeros(size)
            keep = min(size, old_bias.shape[0])
            new_bias[:keep] = old_bias.detach()[:keep]
            if mean_resizing and size > keep:  # as transformers' mean resizing of an LM head bias
                new_bias[keep:] = old_bias.detach().float().mean().to(new_bias.dtype)
            self.lm_head.bias = nn.Parameter(new_bias, requires_grad=old_bias.requires_grad)
        return embeddings

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MaskedLMOutput:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Token ids to predict; -100 is ignored.
        """
        outputs = self.model(
            input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, position_ids=position_ids,
            inputs_embeds=inputs_embeds, return_dict=True, **kwargs,
        )
        logits = self.lm_head(outputs.last_hidden_state)
        loss = None
        if labels is not None:
            loss = CrossEntropyLoss()(logits.view(-1, logits.shape[-1]).float(), labels.view(-1).to(logits.device))
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                              attentions=outputs.attentions)


def pool_hidden_states(
    hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, pooling: str
) -> torch.Tensor:
    """[CLS] (first token) or mean over real tokens."""
    if pooling == "cls":
        return hidden_states[:, 0]
    if attention_mask is None:
        return hidden_states.mean(dim=1)
    weights = attention_mask.to(hidden_states.dtype).unsqueeze(-1)
    return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def classification_loss(config, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """transformers' rule: regression / single-label / multi-label from `problem_type` or the labels' dtype."""
    num_labels = config.num_labels
    if config.problem_type is None:
        if num_labels == 1:
            config.problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    labels = labels.to(logits.device)
    if config.problem_type == "regression":
        if num_labels == 1:
            return MSELoss()(logits.squeeze(), labels.squeeze().to(logits.dtype))
        return MSELoss()(logits, labels.to(logits.dtype))
    if config.problem_type == "single_label_classification":
        return CrossEntropyLoss()(logits.view(-1, num_labels), labels.view(-1))
    if config.problem_type == "multi_label_classification":
        return BCEWithLogitsLoss()(logits, labels.to(logits.dtype))
    raise ValueError(
        f"problem_type={config.problem_type!r} is not valid; choose 'regression', "
        "'single_label_classification' or 'multi_label_classification'."
    )


class HfAttentionClassificationHead(nn.Module):
    """pooled -> dense -> tanh -> dropout -> projection (BERT pooler + classifier, RoBERTa/BART head)."""

    def __init__(self, config: HfAttentionConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.dropout(torch.tanh(self.dense(pooled))))


class HfAttentionForSequenceClassification(HfAttentionPreTrainedModel):
    def __init__(self, config: HfAttentionConfig):
        super().__init__(config)
        self.model = HfAttentionModel(config)
        self.classifier = HfAttentionClassificationHead(config)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SequenceClassifierOutput:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Class ids (or floats for regression / multi-label), loss chosen as transformers does.
        """
        outputs = self.model(
            input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, position_ids=position_ids,
            inputs_embeds=inputs_embeds, return_dict=True, **kwargs,
        )
        pooled = pool_hidden_states(outputs.last_hidden_state, attention_mask, self.config.pooling)
        logits = self.classifier(pooled)
        loss = classification_loss(self.config, logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                        attentions=outputs.attentions)


class HfAttentionForQuestionAnswering(HfAttentionPreTrainedModel):
    def __init__(self, config: HfAttentionConfig):
        super().__init__(config)
        self.model = HfAttentionModel(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        start_positions: torch.Tensor | None = None,
        end_positions: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> QuestionAnsweringModelOutput:
        r"""
        start_positions / end_positions (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Token indices of the answer span; positions outside the sequence are ignored (BERT convention).
        """
        outputs = self.model(
            input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, position_ids=position_ids,
            inputs_embeds=inputs_embeds, return_dict=True, **kwargs,
        )
        logits = self.qa_outputs(outputs.last_hidden_state)
        start_logits, end_logits = (t.squeeze(-1).contiguous() for t in logits.split(1, dim=-1))
        loss = None
        if start_positions is not None and end_positions is not None:
            ignored = start_logits.size(1)
            start_positions = start_positions.view(-1).clamp(0, ignored).to(start_logits.device)
            end_positions = end_positions.view(-1).clamp(0, ignored).to(end_logits.device)
            loss_fct = CrossEntropyLoss(ignore_index=ignored)
            loss = (loss_fct(start_logits, start_positions) + loss_fct(end_logits, end_positions)) / 2
        return QuestionAnsweringModelOutput(
            loss=loss, start_logits=start_logits, end_logits=end_logits,
            hidden_states=outputs.hidden_states, attentions=outputs.attentions,
        )


class HfAttentionDecoder(HfAttentionStackMixin, HfAttentionPreTrainedModel):
    """Causal self-attention stack (with a KV cache), and cross-attention when it serves an encoder-decoder.

    Positional meaning in cross-attention (as T5): no positional term across the two sequences. Absolute
    types (sinusoidal/learned) reach cross-attention through the hidden states of each side; rotary,
    ALiBi and relative bias act only inside self-attention, because a distance between a target and a
    source token has no meaning. Sparse patterns apply to self-attention (kept causal); cross-attention is
    dense. Additive scoring applies to both, as in Bahdanau et al.
    """

    _can_record_outputs = {
        "hidden_states": HfAttentionLayer,
        "attentions": OutputRecorder(HfAttentionAttention, index=1, layer_name="self_attn"),
        "cross_attentions": OutputRecorder(HfAttentionAttention, index=1, layer_name="encoder_attn"),
    }

    def __init__(self, config: HfAttentionConfig, add_cross_attention: bool = False, num_layers: int | None = None):
        super().__init__(config)
        num_layers = num_layers if num_layers is not None else config.num_hidden_layers
        self.add_cross_attention = add_cross_attention
        self.embeddings = HfAttentionEmbeddings(config, use_token_types=False)
        self.layers = nn.ModuleList(
            [HfAttentionLayer(config, i, is_decoder=True, add_cross_attention=add_cross_attention)
             for i in range(num_layers)]
        )
        self.final_layer_norm = (
            nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.norm_position == "pre" else None
        )
        self._build_positional(config, bidirectional=False)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        past_key_values: Cache | None = None,  # the name before transformers 5.24
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPastAndCrossAttentions:
        r"""
        attention_mask (`torch.Tensor` of shape `(batch_size, past_length + sequence_length)`, *optional*):
            1 for real tokens, 0 for padding, over the cached and the new tokens.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Specify exactly one of input_ids or inputs_embeds.")
        reference = input_ids if input_ids is not None else inputs_embeds
        batch, seq_len = reference.shape[:2]
        cache = resolve_cache(cache, past_key_values)
        if use_cache and cache is None:
            cache = (
                EncoderDecoderCache(DynamicCache(config=self.config), DynamicCache(config=self.config))
                if self.add_cross_attention
                else DynamicCache(config=self.config)
            )
        past_length = cache.get_seq_length() if cache is not None else 0
        position_ids = _expand_positions(position_ids, seq_len, past_length, reference.device)
        hidden_states = self.embeddings(input_ids, position_ids, None, inputs_embeds)
        inputs = self._attention_inputs(
            position_ids, attention_mask, hidden_states.dtype, causal=True, past_length=past_length,
            batch_size=batch,
        )
        cross_inputs = None
        if encoder_hidden_states is not None:
            src_len = encoder_hidden_states.shape[1]
            src_positions = torch.arange(src_len, device=reference.device)[None]
            padding = None
            if encoder_attention_mask is not None:
                _check_mask_batch("encoder_attention_mask", encoder_attention_mask, batch)
            if encoder_attention_mask is not None and not bool(encoder_attention_mask.all()):
                padding = encoder_attention_mask.to(torch.bool)
            cross_inputs = AttentionInputs(q_positions=position_ids, k_positions=src_positions,
                                           key_padding_mask=padding)
        hidden_states = self._run_layers(
            hidden_states, inputs, encoder_hidden_states, cross_inputs=cross_inputs,
            cache=cache, output_attentions=kwargs.get("output_attentions"),
        )
        return BaseModelOutputWithPastAndCrossAttentions(
            last_hidden_state=hidden_states, **cache_field(cache if use_cache else None)
        )


def shift_tokens_right(input_ids: torch.Tensor, pad_token_id: int | None, decoder_start_token_id: int | None):
    """BART/T5: decoder inputs are the labels shifted right behind the start token; -100 becomes padding."""
    if decoder_start_token_id is None:
        raise ValueError("config.decoder_start_token_id must be set to build decoder_input_ids from labels.")
    if pad_token_id is None:
        raise ValueError("config.pad_token_id must be set to build decoder_input_ids from labels.")
    shifted = input_ids.new_zeros(input_ids.shape)
    shifted[:, 1:] = input_ids[:, :-1].clone()
    shifted[:, 0] = decoder_start_token_id
    return shifted.masked_fill(shifted == -100, pad_token_id)


class HfAttentionEncoderDecoderModel(HfAttentionPreTrainedModel):
    """Encoder + decoder sharing one token embedding (BART layout), without an LM head.

    As BART: `shared`, `encoder` and `decoder` each own an embedding module and the parameters are tied through
    `_tied_weights_keys`, so a checkpoint without them reports them missing and initialises them (one module
    assigned three times stayed on the meta device). Unlike BART the two sides always share their table, whatever
    `tie_word_embeddings` says (that flag ties the LM head): checkpoints hold only `shared.weight`.
    """

    _tied_weights_keys = {
        "encoder.embeddings.word_embeddings.weight": "shared.weight",
        "decoder.embeddings.word_embeddings.weight": "shared.weight",
    }

    def __init__(self, config: HfAttentionConfig):
        super().__init__(config)
        self.shared = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.encoder = HfAttentionModel(config, num_layers=config.encoder_layers)
        self.decoder = HfAttentionDecoder(config, add_cross_attention=True, num_layers=config.decoder_layers)
        self.post_init()

    def get_expanded_tied_weights_keys(self, all_submodels: bool = False) -> dict:
        """The encoder and decoder tables are always `shared` (transformers drops every tie when
        `tie_word_embeddings=False`; checkpoints saved that way hold `shared.weight` only)."""
        tied = super().get_expanded_tied_weights_keys(all_submodels=all_submodels)
        return tied if all_submodels else {**self._tied_weights_keys, **tied}

    def get_input_embeddings(self) -> nn.Embedding:
        return self.shared

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.shared = value
        self.encoder.embeddings.word_embeddings = value
        self.decoder.embeddings.word_embeddings = value

    def get_encoder(self, modality: str | None = None) -> HfAttentionModel:
        return self.encoder

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        decoder_position_ids: torch.Tensor | None = None,
        encoder_outputs: BaseModelOutput | tuple | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        past_key_values: Cache | None = None,  # the name before transformers 5.24
        **kwargs: Unpack[TransformersKwargs],
    ) -> Seq2SeqModelOutput:
        if decoder_input_ids is None and decoder_inputs_embeds is None:
            if input_ids is None:
                raise ValueError("Pass decoder_input_ids, decoder_inputs_embeds, or input_ids to shift right.")
            decoder_input_ids = shift_tokens_right(
                input_ids, self.config.pad_token_id, self.config.decoder_start_token_id
            )
        if encoder_outputs is None:
            encoder_outputs = self.encoder(
                input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                return_dict=True, **kwargs,
            )
        elif not isinstance(encoder_outputs, BaseModelOutput):
            encoder_outputs = BaseModelOutput(
                last_hidden_state=encoder_outputs[0],
                hidden_states=encoder_outputs[1] if len(encoder_outputs) > 1 else None,
                attentions=encoder_outputs[2] if len(encoder_outputs) > 2 else None,
            )
        decoder_outputs = self.decoder(
            input_ids=decoder_input_ids,
            attention_mask=decoder_attention_mask,
            position_ids=decoder_position_ids,
            encoder_hidden_states=encoder_outputs.last_hidden_state,
            encoder_attention_mask=attention_mask,
            cache=resolve_cache(cache, past_key_values),
            inputs_embeds=decoder_inputs_embeds,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        return Seq2SeqModelOutput(
            last_hidden_state=decoder_outputs.last_hidden_state,
            **cache_field(output_cache(decoder_outputs)),
            decoder_hidden_states=decoder_outputs.hidden_states,
            decoder_attentions=decoder_outputs.attentions,
            cross_attentions=decoder_outputs.cross_attentions,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states,
            encoder_attentions=encoder_outputs.attentions,
        )


class HfAttentionForConditionalGeneration(HfAttentionPreTrainedModel, GenerationMixin):
    """Encoder-decoder with a tied LM head, for summarization; loss as BART/T5 (labels not shifted)."""

    _tied_weights_keys = {"lm_head.weight": "model.shared.weight"}
    _keys_to_ignore_on_load_missing = ["final_logits_bias"]

    def __init__(self, config: HfAttentionConfig):
        # generate() decides how to run from this flag; an encoder-decoder config must say so (on a copy: the
        # caller's config object is never changed).
        if not config.is_encoder_decoder:
            config = copy.deepcopy(config)
            config.is_encoder_decoder = True
        super().__init__(config)
        self.model = HfAttentionEncoderDecoderModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_encoder(self, modality: str | None = None) -> HfAttentionModel:
        return self.model.encoder

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        decoder_position_ids: torch.Tensor | None = None,
        encoder_outputs: BaseModelOutput | tuple | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        past_key_values: Cache | None = None,  # the name before transformers 5.24
        **kwargs: Unpack[TransformersKwargs],
    ) -> Seq2SeqLMOutput:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, target_length)`, *optional*):
            Target ids, -100 ignored. Decoder inputs are built by shifting them right (not the loss).
        """
        if labels is not None:
            use_cache = False
            if decoder_input_ids is None and decoder_inputs_embeds is None:
                decoder_input_ids = shift_tokens_right(
                    labels, self.config.pad_token_id, self.config.decoder_start_token_id
                )
        outputs = self.model(
            input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask, decoder_position_ids=decoder_position_ids,
            encoder_outputs=encoder_outputs, cache=resolve_cache(cache, past_key_values), inputs_embeds=inputs_embeds,
            decoder_inputs_embeds=decoder_inputs_embeds, use_cache=use_cache, return_dict=True, **kwargs,
        )
        logits = self.lm_head(outputs.last_hidden_state)
        loss = None
        if labels is not None:
            loss = CrossEntropyLoss()(logits.view(-1, logits.shape[-1]).float(), labels.view(-1).to(logits.device))
        return Seq2SeqLMOutput(
            loss=loss,
            logits=logits,
            **cache_field(output_cache(outputs)),
            decoder_hidden_states=outputs.decoder_hidden_states,
            decoder_attentions=outputs.decoder_attentions,
            cross_attentions=outputs.cross_attentions,
            encoder_last_hidden_state=outputs.encoder_last_hidden_state,
            encoder_hidden_states=outputs.encoder_hidden_states,
            encoder_attentions=outputs.encoder_attentions,
        )


class HfAttentionForCausalLM(HfAttentionPreTrainedModel, GenerationMixin):
    """Decoder-only language model (the decoder stack without cross-attention)."""

    _tied_weights_keys = {"lm_head.weight": "model.embeddings.word_embeddings.weight"}

    def __init__(self, config: HfAttentionConfig):
        # As BartForCausalLM: the config describes a causal model (see sliding_window); on a copy, so the caller's
        # config object is never changed.
        if not config.is_decoder:
            config = copy.deepcopy(config)
            config.is_decoder = True
        super().__init__(config)
        self.model = HfAttentionDecoder(config, add_cross_attention=False)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,  # the name before transformers 5.24
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Usually `input_ids`; shifted inside the loss (next-token prediction), -100 ignored.
        """
        outputs = self.model(
            input_ids, attention_mask=attention_mask, position_ids=position_ids,
            cache=resolve_cache(cache, past_key_values), inputs_embeds=inputs_embeds, use_cache=use_cache,
            return_dict=True, **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, **cache_field(output_cache(outputs)),
            hidden_states=outputs.hidden_states, attentions=outputs.attentions,
        )


__all__ = [
    "HfAttentionPreTrainedModel",
    "HfAttentionDecoder",
    "HfAttentionEncoderDecoderModel",
    "HfAttentionForConditionalGeneration",
    "HfAttentionForCausalLM",
    "HfAttentionModel",
    "HfAttentionForMaskedLM",
    "HfAttentionForSequenceClassification",
    "HfAttentionForQuestionAnswering",
]
