"""One name for the generation cache across transformers versions.

transformers 5.24 renamed the KV cache from ``past_key_values`` to ``cache``: ``generate()`` passes
``cache=`` to ``forward`` and reads ``outputs.cache``; 5.23 passes and reads ``past_key_values``.
Our forwards take ``cache`` and still accept ``past_key_values`` (so callers and recipes written for
either version work), and our outputs fill whichever field the installed output classes declare.
"""

import warnings
from typing import Any

from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def resolve_cache(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """The cache a caller passed under either name; both at once is ambiguous and refused."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("Pass the KV cache once, as `cache` (or the older name `past_key_values`), not both.")
    if past_key_values is not None and CACHE_FIELD == "cache":
        # As transformers' own models (`@deprecate_kwarg("past_key_values", new_name="cache")`) on 5.24+.
        warnings.warn("`past_key_values` is deprecated; use `cache` instead.", FutureWarning, stacklevel=3)
    return cache if cache is not None else past_key_values


def cache_field(cache: Cache | None) -> dict[str, Any]:
    """Keyword for an output dataclass, under the installed version's field name."""
    return {CACHE_FIELD: cache}


def output_cache(output: Any) -> Cache | None:
    """The cache an output carries, without the deprecation warning of the old attribute on 5.24+."""
    return getattr(output, CACHE_FIELD)
