"""A new scoring function and a new positional type written as a contributor would: one class each.

Not registered on import (so the rest of the suite sees the shipped registries); `register()` adds both, and
`toy_variants_plugin` (named in HF_ATTENTION_PLUGINS) does it in a subprocess, e.g. a sweep's cell.
"""

import math

import torch
from torch import nn
from transformers import initialization as init

from hf_attention.positions_2d_hf_attention import decode_relative
from hf_attention.positions_hf_attention import register_positional_encoding
from hf_attention.registry_hf_attention import (
    ATTENTION_SCORES,
    POSITIONAL_ENCODINGS,
    PositionalEncoding,
)
from hf_attention.scores_hf_attention import StandardScore, register_attention_score


class ToyCosineScore(StandardScore):
    """Cosine-similarity attention with a learned per-head temperature: softmax(t_h cos(q, k)) V."""

    name = "toy_cosine"
    has_parameters = True

    def __init__(self, config):
        super().__init__(config)
        self.log_temperature = nn.Parameter(torch.empty(self.num_heads))
        self.scaling = 1.0

    def init_weights(self, config) -> None:
        init.constant_(self.log_temperature, math.log(10.0))

    def forward(self, attention, query, key, value, inputs, dropout=0.0, output_attentions=False, **kwargs):
        query = nn.functional.normalize(query, dim=-1) * self.log_temperature.exp()[:, None, None].to(query.dtype)
        key = nn.functional.normalize(key, dim=-1)
        return super().forward(attention, query, key, value, inputs, dropout, output_attentions)


class ToyLearnedSlopeBias(PositionalEncoding):
    """ALiBi with a learned slope per head: bias = -softplus(w_h) * distance."""

    name = "toy_slope"
    has_parameters = True
    provides_score_bias = True

    def __init__(self, num_heads: int, two_d: bool = False):
        super().__init__()
        self.slope = nn.Parameter(torch.zeros(num_heads))
        self.two_d = two_d

    @classmethod
    def from_config(cls, config, bidirectional=True):
        return cls(config.num_attention_heads)

    @classmethod
    def grid_form(cls, config, num_prefix_tokens):
        return cls(config.num_attention_heads, two_d=True)

    def score_bias(self, relative_position):
        if self.two_d:
            involves_prefix, drow, dcol = decode_relative(relative_position)
            distance = torch.sqrt((drow * drow + dcol * dcol).float()).masked_fill(involves_prefix, 0.0)
        else:
            distance = relative_position.abs().float()
        slopes = nn.functional.softplus(self.slope).view(-1, *([1] * distance.dim()))
        return -slopes * distance


def register() -> None:
    register_attention_score(ToyCosineScore)
    register_positional_encoding(ToyLearnedSlopeBias)


def unregister() -> None:
    ATTENTION_SCORES.pop(ToyCosineScore.name, None)
    POSITIONAL_ENCODINGS.pop(ToyLearnedSlopeBias.name, None)
