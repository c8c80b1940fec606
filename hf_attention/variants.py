"""The variant grid: every meaningful attention_type x position_embedding_type (x sparse_pattern)."""

from collections.abc import Iterator

from .configuration_hf_attention import ATTENTION_TYPES, POSITION_EMBEDDING_TYPES, SPARSE_PATTERNS


def variant_name(attention_type: str, position_embedding_type: str, sparse_pattern: str | None = None) -> str:
    attention = f"sparse-{sparse_pattern}" if attention_type == "sparse" else attention_type
    return f"{attention}+{position_embedding_type}"


def iter_variants() -> Iterator[dict]:
    """Config overrides for each variant. `rope` attention implies rope positions, so it appears once."""
    for attention_type in ATTENTION_TYPES:
        positions = ("rope",) if attention_type == "rope" else POSITION_EMBEDDING_TYPES
        patterns = SPARSE_PATTERNS if attention_type == "sparse" else (None,)
        for pattern in patterns:
            for position in positions:
                overrides = {"attention_type": attention_type, "position_embedding_type": position}
                if pattern is not None:
                    overrides["sparse_pattern"] = pattern
                yield overrides


def parse_variant(name: str) -> dict:
    """Inverse of `variant_name`: 'sparse-local+alibi' -> config overrides; ValueError lists the valid names."""
    for overrides in iter_variants():
        if variant_name(
            overrides["attention_type"], overrides["position_embedding_type"], overrides.get("sparse_pattern")
        ) == name:
            return dict(overrides)
    valid = [variant_name(o["attention_type"], o["position_embedding_type"], o.get("sparse_pattern"))
             for o in iter_variants()]
    raise ValueError(f"variant {name!r} is not valid; choose one of {', '.join(valid)}.")
