"""The variant grid, derived from the registries: every scoring function x sparse pattern x positional type
that the config accepts (combinations a scoring function refuses are left out, with the reason on request)."""

import functools
from collections.abc import Iterator

from .configuration_hf_attention import HfAttentionConfig, normalise_legacy_variant
from .registry_hf_attention import ATTENTION_SCORES, POSITIONAL_ENCODINGS, SPARSE_PATTERN_CLASSES


def attention_types() -> tuple[str, ...]:
    return tuple(ATTENTION_SCORES)


def position_embedding_types() -> tuple[str, ...]:
    return tuple(POSITIONAL_ENCODINGS)


def sparse_patterns() -> tuple[str, ...]:
    return tuple(SPARSE_PATTERN_CLASSES)


def variant_name(attention_type: str, position_embedding_type: str, sparse_pattern: str | None = None) -> str:
    """'standard+alibi', 'additive-local+rope': scoring[-pattern]+positions (first-release spellings accepted)."""
    values = normalise_legacy_variant({"attention_type": attention_type, "sparse_pattern": sparse_pattern,
                                       "position_embedding_type": position_embedding_type})
    scoring, pattern = values["attention_type"], values["sparse_pattern"]
    return f"{scoring}{'' if pattern is None else '-' + pattern}+{values['position_embedding_type']}"


def refusal(attention_type: str, position_embedding_type: str, sparse_pattern: str | None = None) -> str | None:
    """Why the config refuses this combination, or None when it builds."""
    registries = (tuple(ATTENTION_SCORES.items()), tuple(POSITIONAL_ENCODINGS.items()))
    return _refusal(attention_type, position_embedding_type, sparse_pattern, registries)


@functools.lru_cache(maxsize=4096)
def _refusal(attention_type, position_embedding_type, sparse_pattern, registries) -> str | None:
    """Cached per registry state (a registered or removed class changes the key)."""
    try:
        HfAttentionConfig(attention_type=attention_type, position_embedding_type=position_embedding_type,
                          sparse_pattern=sparse_pattern)
    except ValueError as error:
        return str(error)
    return None


def iter_variants(attention_types_: tuple[str, ...] | None = None) -> Iterator[dict]:
    """Config overrides for each variant the registries and the config accept (dense first, then patterns)."""
    for attention_type in attention_types_ or attention_types():
        for pattern in (None, *sparse_patterns()):
            for position in position_embedding_types():
                if refusal(attention_type, position, pattern) is not None:
                    continue
                overrides = {"attention_type": attention_type, "position_embedding_type": position}
                if pattern is not None:
                    overrides["sparse_pattern"] = pattern
                yield overrides


def covering_variants() -> list[dict]:
    """A cover of the grid for the expensive test matrices: every scoring function with every positional type
    (dense), standard scoring with every pattern and positional type (where padding bugs lived), and every other
    scoring function with every pattern once, the positional types taking turns."""
    variants = list(iter_variants())
    cover = [v for v in variants if "sparse_pattern" not in v or v["attention_type"] == "standard"]
    for attention_type in attention_types():
        for pattern in sparse_patterns() if attention_type != "standard" else ():
            options = [v for v in variants
                       if v["attention_type"] == attention_type and v.get("sparse_pattern") == pattern]
            if options:
                cover.append(options[len(cover) % len(options)])
    return cover


def parse_variant(name: str) -> dict:
    """Inverse of `variant_name` ('standard-local+alibi', or the first release's 'sparse-local+alibi', 'rope+rope')
    -> config overrides; ValueError lists the valid names."""
    names = {variant_name(o["attention_type"], o["position_embedding_type"], o.get("sparse_pattern")): o
             for o in iter_variants()}
    if name not in names and "+" in name:
        scoring, _, position = name.rpartition("+")
        head, _, pattern = scoring.partition("-")
        try:
            name = variant_name(head, position, pattern or None)
        except ValueError:
            pass
    if name in names:
        return dict(names[name])
    raise ValueError(f"variant {name!r} is not valid; choose one of {', '.join(names)}.")


def position_table_length(config) -> int | None:
    """Longest input a config's positions cover, or None when they run at any length.

    Ours ask the positional registry (`extrapolates`); transformers' text models with BERT's `"absolute"` (or
    unset) `position_embedding_type` are capped by `max_position_embeddings`.
    """
    limit = getattr(config, "max_position_embeddings", None)
    kind = getattr(config, "position_embedding_type", None)
    if limit is None:
        return None
    if kind in POSITIONAL_ENCODINGS and getattr(config, "model_type", None) == HfAttentionConfig.model_type:
        return None if POSITIONAL_ENCODINGS[kind].extrapolates else int(limit)
    return int(limit) if kind in (None, "absolute") else None
