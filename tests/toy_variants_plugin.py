"""Imported through HF_ATTENTION_PLUGINS: registers the toy variants in a fresh process (a sweep cell)."""

import toy_variants

toy_variants.register()
