"""The three registries of variants, complete: importing this module imports every module that defines one.

A module that adds a scoring function, positional encoding or sparse pattern in a new file is imported
here once; everything else (config choices, the variant grid, the sweep, recipes, conversion, integration,
benchmarks) reads the registries and never lists names.
"""

from .attention_additive import AdditiveScore
from .attention_gaussian import GaussianScore
from .attention_linear import LinearScore
from .attention_sparse import SPARSE_PATTERN_CLASSES, SparsePattern, sparse_pattern_class
from .positions_hf_attention import POSITIONAL_ENCODINGS, PositionalEncoding, positional_encoding_class
from .scores_hf_attention import ATTENTION_SCORES, AttentionScore, attention_score_class

__all__ = [
    "ATTENTION_SCORES",
    "POSITIONAL_ENCODINGS",
    "SPARSE_PATTERN_CLASSES",
    "AdditiveScore",
    "GaussianScore",
    "LinearScore",
    "AttentionScore",
    "PositionalEncoding",
    "SparsePattern",
    "attention_score_class",
    "positional_encoding_class",
    "sparse_pattern_class",
]
