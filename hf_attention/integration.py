"""Our parameter-free attention variants as ``attn_implementation`` choices for transformers' own models.

``import hf_attention.integration`` (``import hf_attention`` does it too) registers, in transformers'
``AttentionInterface`` and ``AttentionMaskInterface``:

- ``"hf_attention_sparse"``: the sparse pattern of the model config (``config.hf_attention_sparse_*``),
- ``"hf_attention_<bias>"`` for every parameter-free score-bias positional encoding of the registry (ALiBi,
  ``-slope_h * |i - j|`` added to the scores with BLOOM's slopes: ``"hf_attention_alibi"``),
- ``"hf_attention_sparse_<bias>"``: both.
Variants with learned parameters (the registries' ``has_parameters``) are refused with the reason.

Any model whose attention layers dispatch through ``ALL_ATTENTION_FUNCTIONS`` (BERT, ViT, BART, Llama, ...)
can then use them::

    import hf_attention.integration  # registers the names; from_pretrained needs it first
    model = AutoModel.from_pretrained(path, attn_implementation="hf_attention_sparse")
    # or, setting the pattern on model.config:
    hf_attention.use_variant(model, "sparse", pattern="local", window_size=64)

The mask entry is transformers' ``sdpa_mask``: without a matching ``AttentionMaskInterface`` entry
transformers silently drops the padding mask. Variants only change self-attention: cross-attention keys are
another sequence, so there they run plain SDPA. Decoders keep their causal mask, and the pattern is the causal
form (``LocalPattern``: the ``window_size`` previous tokens). Positions for the pattern and the bias are those
of the real tokens (padding does not count), queries taking their own key's position, so padded batches,
cached decoding and left-padded generation see the same distances as one unpadded full forward.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface
from transformers.utils import logging

from .attention_sparse import SparsePattern, make_sparse_pattern, sparse_attention
from .registry_hf_attention import ATTENTION_SCORES, POSITIONAL_ENCODINGS, PositionalEncoding

__all__ = [
    "ATTENTION_IMPLEMENTATIONS",
    "SPARSE_CONFIG_PREFIX",
    "SPARSE_DEFAULTS",
    "register",
    "sparse_pattern_from_config",
    "use_variant",
]

# Config attribute prefix: `config.hf_attention_sparse_window_size` etc. (saved in config.json with the model).
SPARSE_CONFIG_PREFIX = "hf_attention_sparse_"
# Same defaults as HfAttentionConfig's sparse_* fields; max_positions falls back to max_position_embeddings.
SPARSE_DEFAULTS: dict[str, Any] = {
    "pattern": "local",
    "window_size": 128,
    "block_size": 64,
    "stride": 64,
    "num_global_tokens": 1,
    "num_random_blocks": 1,
    "seed": 0,
    "max_positions": None,
}
_DEFAULT_MAX_POSITIONS = 4096
logger = logging.get_logger(__name__)



def _needs_parameters() -> dict[str, str]:
    """Variants with learned tensors transformers' models do not have, with the first line of their docstring."""
    out = {}
    for registry in (ATTENTION_SCORES, POSITIONAL_ENCODINGS):
        for name, cls in registry.items():
            if cls.has_parameters:
                out[name] = (cls.__doc__ or name).strip().splitlines()[0].rstrip(".")
    return out


def _free_score_biases() -> list[str]:
    """Parameter-free score-bias positional encodings: each can be added to any model's scores."""
    return [name for name, cls in POSITIONAL_ENCODINGS.items() if cls.provides_score_bias and not cls.has_parameters]


# --------------------------------------------------------------------------------------------------
# Reading the configuration
# --------------------------------------------------------------------------------------------------


def _sparse_options(config: Any) -> dict[str, Any]:
    options = {
        name: getattr(config, SPARSE_CONFIG_PREFIX + name, default) if config is not None else default
        for name, default in SPARSE_DEFAULTS.items()
    }
    if options["max_positions"] is None:
        options["max_positions"] = getattr(config, "max_position_embeddings", None) or _DEFAULT_MAX_POSITIONS
    return options


@functools.lru_cache(maxsize=64)
def _build_pattern(items: tuple[tuple[str, Any], ...]) -> SparsePattern:
    options = dict(items)
    try:
        return make_sparse_pattern(options.pop("pattern"), **options)
    except ValueError as err:
        raise ValueError(
            f"{err} (sparse options are read from config.{SPARSE_CONFIG_PREFIX}*; set them with "
            "hf_attention.use_variant(model, 'sparse', pattern=..., window_size=...))"
        ) from err


def sparse_pattern_from_config(config: Any) -> SparsePattern:
    """The pattern named by ``config.hf_attention_sparse_*`` (defaults where unset); cached per option set."""
    return _build_pattern(tuple(sorted(_sparse_options(config).items())))


@functools.lru_cache(maxsize=16)
def _score_bias(name: str, num_heads: int) -> PositionalEncoding:
    """A parameter-free score-bias encoding for `num_heads` heads (it reads nothing else of a config)."""
    return POSITIONAL_ENCODINGS[name].from_config(_Heads(num_heads))


class _Heads:
    def __init__(self, num_heads: int):
        self.num_attention_heads = num_heads


# --------------------------------------------------------------------------------------------------
# The attention function
# --------------------------------------------------------------------------------------------------


def _is_cross_attention(module: torch.nn.Module, causal: bool, q_len: int, kv_len: int) -> bool:
    """Whether keys come from another sequence; the signal differs per model family.

    BERT: the cross layer is its own class ``BertCrossAttention`` (``BertAttention.is_cross_attention`` sits on
    the parent). BART/mBART/Marian/Whisper: ``encoder_attn`` is ``is_decoder=True`` but ``is_causal=False``,
    while both self-attentions of a decoder are causal and the encoder's has ``is_decoder=False``. Anything
    else: a non-causal layer whose key length differs from the query length (encoders keep no cache).
    """
    if getattr(module, "is_cross_attention", False) or "crossattention" in type(module).__name__.lower():
        return True
    if getattr(module, "is_decoder", False) and not getattr(module, "is_causal", True):
        return True
    return not causal and q_len != kv_len


def _as_bool_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(allowed, additive part) of a 4-D mask; float (eager-style) masks mark blocked entries with dtype min."""
    if mask.dtype == torch.bool:
        return mask, None
    allowed = mask > torch.finfo(mask.dtype).min / 2
    extra = mask.masked_fill(~allowed, 0.0)
    return allowed, (extra if bool(extra.any()) else None)


def _real_positions(
    allowed: torch.Tensor | None, causal: bool, q_len: int, kv_len: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions [B or 1, Lq] and [B or 1, Lk] of queries and keys counted over real (unpadded) tokens.

    Keys: running count of real keys. A key is real when the mask's last query row attends it (causally that
    query sees every earlier key; bidirectionally every row sees all real keys). A causal query sits at the
    last key it attends, its own; a bidirectional one (same length) at its own slot. Without a mask: slots,
    queries aligned to the end of the keys (cached decoding).
    """
    if allowed is None:
        kv_pos = torch.arange(kv_len, device=device)[None]
        return kv_pos[:, kv_len - q_len :], kv_pos
    rows = allowed[:, 0]  # [B, Lq, Lk]
    kv_pos = (rows[:, -1].long().cumsum(-1) - 1).clamp(min=0)  # leading padding: position 0, masked anyway
    if causal:
        slot = (rows.long() * torch.arange(1, kv_len + 1, device=device)).amax(-1) - 1  # -1: empty row
        fallback = torch.arange(kv_len - q_len, kv_len, device=device).expand_as(slot)
        slot = torch.where(slot >= 0, slot, fallback)
    else:
        slot = torch.arange(kv_len - q_len, kv_len, device=device).expand(rows.shape[0], q_len)
    return kv_pos.gather(1, slot), kv_pos


def _blocked_padding(
    mask: torch.Tensor | None, pattern: SparsePattern, causal: bool, batch: int, seq_len: int
) -> tuple[bool, torch.Tensor | None]:
    """(usable, key padding [B, L]) for the block-skipping kernel, which takes only causal + key padding.

    Usable when the mask is exactly (causal and) key padding, and slot distances are real distances for the
    pattern: one contiguous run of real tokens for patterns of ``i - j`` only, real tokens from slot 0 else.
    The check reads the O(L^2) mask once, which transformers has already built.
    """
    if mask is None:
        return True, None
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1:
        return False, None
    keys = mask[:, 0, -1].expand(batch, seq_len)  # [B, L]
    expected = keys[:, None, :]
    if causal:
        expected = expected & torch.ones(seq_len, seq_len, dtype=torch.bool, device=mask.device).tril()
    if not torch.equal(mask[:, 0].expand(batch, seq_len, seq_len), expected.expand(batch, seq_len, seq_len)):
        return False, None
    edges = F.pad(keys.to(torch.int8), (1, 1)).diff(dim=-1)
    contiguous = bool(((edges == 1).sum(-1) <= 1).all())
    from_start = bool((keys[:, :1] | ~keys.any(-1, keepdim=True)).all())
    # patterns of i - j only (``shift_invariant``): slot distances are the real distances for any one run
    usable = contiguous and (from_start or pattern.shift_invariant)
    return usable, keys


def _dense(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    pattern: SparsePattern | None,
    score_bias: Callable[[torch.Tensor], torch.Tensor] | None,
    causal: bool,
    scaling: float,
    dropout: float,
) -> torch.Tensor:
    """SDPA under (model mask & pattern) + bias, all evaluated on real-token positions; out [B, Lq, H, D]."""
    q_len, kv_len, device = query.shape[2], key.shape[2], query.device
    allowed, extra = _as_bool_mask(mask) if mask is not None else (None, None)
    if allowed is None:  # causal without a mask: lower-right aligned (cached decoding)
        q_idx = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
        base = (torch.arange(kv_len, device=device) <= q_idx) if causal else None
        allowed = None if base is None else base[None, None]
    q_pos, kv_pos = _real_positions(allowed, causal, q_len, kv_len, device)
    q_pos, kv_pos = q_pos[:, :, None], kv_pos[:, None, :]  # [B', Lq, 1], [B', 1, Lk]
    keep = allowed
    if pattern is not None:
        rule = pattern.allowed(q_pos, kv_pos, causal, seq_len=kv_len)[:, None]
        keep = rule if keep is None else keep & rule
    if keep is not None:
        keep = keep | ~keep.any(-1, keepdim=True)  # padding queries with no key: finite garbage, never NaN
    attn_mask = keep
    if score_bias is not None:
        bias = score_bias(kv_pos - q_pos).movedim(0, 1).to(query.dtype)  # [B', H, Lq, Lk]
        if extra is not None:
            bias = bias + extra.to(query.dtype)
        attn_mask = bias if keep is None else bias.masked_fill(~keep, float("-inf"))
    elif extra is not None:
        attn_mask = extra.to(query.dtype).masked_fill(~keep, float("-inf"))
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2).contiguous()


def _variant_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    sparse: bool,
    bias: str | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Shared body: cross-attention -> plain SDPA; same length -> blocked kernel when it applies; else dense."""
    if kwargs.get("output_attentions", False):
        logger.warning_once("hf_attention variants do not return attention weights (like `sdpa`); use `eager`.")
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    q_len, kv_len = query.shape[2], key.shape[2]
    if _is_cross_attention(module, causal, q_len, kv_len):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=False, **kwargs
        )
    n_rep = query.shape[1] // key.shape[1]
    if n_rep > 1:  # grouped-query attention (Llama): one key/value head per group of query heads
        key, value = key.repeat_interleave(n_rep, dim=1), value.repeat_interleave(n_rep, dim=1)
    if attention_mask is None and causal and 1 < q_len < kv_len:
        # transformers skips the mask only for a prefill into an empty static cache: keys past q_len are empty
        key, value, kv_len = key[:, :, :q_len], value[:, :, :q_len], q_len
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    pattern = sparse_pattern_from_config(getattr(module, "config", None)) if sparse else None
    score_bias = _score_bias(bias, query.shape[1]).score_bias if bias else None

    if pattern is not None and q_len == kv_len:
        usable, key_padding = _blocked_padding(attention_mask, pattern, causal, query.shape[0], q_len)
        if usable:
            out = sparse_attention(
                query, key, value, pattern, causal=causal, key_padding_mask=key_padding, score_bias=score_bias,
                scaling=scaling, dropout=dropout, training=dropout > 0,
            )
            return out, None
    return _dense(query, key, value, attention_mask, pattern, score_bias, causal, scaling, dropout), None


def _attention_function(sparse: bool, bias: str | None) -> Callable[..., tuple[torch.Tensor, None]]:
    def forward(module, query, key, value, attention_mask, **kwargs) -> tuple[torch.Tensor, None]:
        return _variant_attention(module, query, key, value, attention_mask, sparse=sparse, bias=bias, **kwargs)

    forward.__name__ = f"{_name(sparse, bias)}_attention_forward"
    forward.__doc__ = (f"``hf_attention_{_name(sparse, bias)}``: " + " with ".join(
        part for part in ("the config's sparse pattern" if sparse else "", f"the {bias} score bias" if bias else "")
        if part) + " on self-attention; blocked kernel where it applies.")
    return forward


def _name(sparse: bool, bias: str | None) -> str:
    return "_".join(part for part in ("sparse" if sparse else "", bias or "") if part)


def _variants() -> dict[str, tuple[bool, str | None]]:
    """short name -> (sparse, score-bias encoding): the pattern, each free score bias, and each with the pattern."""
    combos = [(True, None)] + [(sparse, bias) for bias in _free_score_biases() for sparse in (False, True)]
    return {_name(sparse, bias): (sparse, bias) for sparse, bias in combos}


# short variant name -> registered attn_implementation name, and name -> function (filled by `register`)
ATTENTION_IMPLEMENTATIONS: dict[str, str] = {}
_FUNCTIONS: dict[str, Callable[..., tuple[torch.Tensor, None]]] = {}


def register() -> None:
    """Register every variant the registries allow, and its mask function (sdpa's boolean masks); idempotent."""
    for short, (sparse, bias) in _variants().items():
        name = f"hf_attention_{short}"
        ATTENTION_IMPLEMENTATIONS[short] = name
        if name not in _FUNCTIONS:
            _FUNCTIONS[name] = _attention_function(sparse, bias)
    for name, fn in _FUNCTIONS.items():
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, sdpa_mask)


def _resolve(variant: str) -> str:
    register()
    short = variant.replace("+", "_").replace("-", "_") if isinstance(variant, str) else variant
    if short in ATTENTION_IMPLEMENTATIONS:
        return ATTENTION_IMPLEMENTATIONS[short]
    if short in _FUNCTIONS:
        return short
    choices = ", ".join(repr(name) for name in ATTENTION_IMPLEMENTATIONS)
    base = short.removeprefix("hf_attention_") if isinstance(short, str) else short
    needs = _needs_parameters()
    if base in needs:
        raise ValueError(
            f"Variant {variant!r} cannot be added to an existing model: {needs[base]} has learned parameters, which "
            f"transformers' models do not have. Parameter-free choices: {choices}. Use HfAttentionConfig("
            f"attention_type/position_embedding_type={base!r}) to train a model with it."
        )
    raise ValueError(f"Unknown attention variant {variant!r}; parameter-free choices: {choices}.")


def _configs(model: PreTrainedModel) -> list[PreTrainedConfig]:
    """The model's config and every sub-model's (composite models give attention layers their sub-config)."""
    seen: dict[int, PreTrainedConfig] = {id(model.config): model.config}
    for module in model.modules():
        config = getattr(module, "config", None)
        if isinstance(config, PreTrainedConfig):
            seen.setdefault(id(config), config)
    return list(seen.values())


def use_variant(model: PreTrainedModel, variant: str, **params: Any) -> PreTrainedModel:
    """Switch ``model`` to ``variant`` (a key of ``ATTENTION_IMPLEMENTATIONS``, e.g. ``sparse_alibi``);
    sparse options go on its config.

    ``params`` are the sparse options (``pattern``, ``window_size``, ``block_size``, ``stride``,
    ``num_global_tokens``, ``num_random_blocks``, ``seed``, ``max_positions``), stored as
    ``config.hf_attention_sparse_<name>`` so ``save_pretrained`` keeps them; reload with
    ``from_pretrained(path, attn_implementation="hf_attention_sparse")`` after importing this module.
    Returns the model (switched in place).
    """
    name = _resolve(variant)
    register()
    if params and "sparse" not in name:
        raise ValueError(f"Variant {variant!r} takes no parameters, got {sorted(params)}.")
    unknown = sorted(set(params) - set(SPARSE_DEFAULTS))
    if unknown:
        raise ValueError(f"Unknown sparse option(s) {unknown}; valid: {sorted(SPARSE_DEFAULTS)}.")
    configs = _configs(model)
    if "sparse" in name:  # validate everything before changing anything
        for config in configs:
            sparse_pattern_from_config(_Overlay(config, params))
    for config in configs:
        for option, value in params.items():
            setattr(config, SPARSE_CONFIG_PREFIX + option, value)
    model.set_attn_implementation(name)
    return model


class _Overlay:
    """A config seen through pending ``use_variant`` options (validation before anything is set)."""

    def __init__(self, config: PreTrainedConfig, params: dict[str, Any]):
        self._config, self._params = config, params

    def __getattr__(self, attr: str) -> Any:
        option = attr.removeprefix(SPARSE_CONFIG_PREFIX)
        if attr.startswith(SPARSE_CONFIG_PREFIX) and option in self._params:
            return self._params[option]
        return getattr(self._config, attr)


register()
