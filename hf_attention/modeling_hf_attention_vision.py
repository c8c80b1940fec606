"""hf_attention vision models: a ViT-style patch encoder whose attention and positions are chosen by config.

pixels -> Conv2d patches (kernel = stride = patch_size) -> [CLS] + patches (`pooling="cls"`) or patches
only (`pooling="mean"`) -> absolute 2-D positions added -> the text family's `HfAttentionLayer` stack
(pre-norm with a final LayerNorm as ViT, or post-norm with a normalised embedding as BERT) -> pooled ->
linear classifier.

Every `position_embedding_type` has a 2-D meaning on the patch grid (row r, column c, raster order):
- `sinusoidal`: channels ``[0, ceil(d/2))`` are the 1-D Vaswani table of r, the rest that of c; [CLS] adds 0.
- `learned`: a ViT table of ``(num_patches (+1 for [CLS])) x hidden``; `interpolate_pos_encoding=True`
  resamples the patch part bicubically to another grid exactly as transformers' ViT does.
- `rope`: axial rotary; the first ``ceil(head_dim/4)`` pairs rotate by r, the others by c; [CLS] unrotated.
- `alibi`: score bias ``-slope_h * sqrt(dr^2 + dc^2)`` (Euclidean patch distance, 1-D ALiBi slopes).
- `relative`: T5 buckets of dr and of dc, one learned scalar per (row bucket, column bucket, head).
- `none`: no positional information.
[CLS] gets no bias to or from patches and no rotation (its self-score gets the zero-offset bias like every
token's). Under RoPE its scores with patches therefore see the patches' absolute rotation, as in RoPE-ViT;
patch-to-patch scores depend only on (dr, dc) for rope/alibi/relative. Those types run at any image size;
`learned` needs `interpolate_pos_encoding=True` away from `config.image_size`.

A patch's (r, c) travels as one position id ``r * 2**16 + c`` (CLS: a reserved far id), so
`AttentionInputs`, the score-bias hooks and the sparse kernels work unchanged: `k_pos - q_pos` decodes to
(dr, dc) (see `positions_2d_hf_attention`). `attention_type="sparse"` uses 2-D patterns over the grid
(`attention_sparse_2d`): `local` = |dr|, |dc| <= sparse_window_size // 2; `strided` = local square of
reach sparse_stride - 1 or the stride lattice; `block` = BigBird on sparse_block_size^2-patch tiles. The
[CLS] token is global in every pattern.
"""

import importlib.util
import os

import torch
from torch import nn
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .attention_sparse import SparsePattern, pattern_from_config
from .configuration_hf_attention import HfAttentionConfig
from .modeling_hf_attention import (
    AttentionInputs,
    HfAttentionLayer,
    HfAttentionPreTrainedModel,
    HfAttentionStackMixin,
    _checkpointing,
    classification_loss,
    pool_hidden_states,
)
from .positions_2d_hf_attention import LearnedPositionTable2D, grid_position_ids
from .positions_hf_attention import positional_encoding_class

IMAGE_PROCESSOR_FILE = "preprocessor_config.json"


def make_image_processor(config: HfAttentionConfig, image_mean=None, image_std=None, **kwargs):
    """transformers' ViT image processor for `config.image_size` (resize, rescale to [0, 1], normalise).

    Without torchvision transformers' `ViTImageProcessor` is the PIL-backed `ViTImageProcessorPil`; it is
    picked directly so no fallback warning is printed (the saved type is "ViTImageProcessor" either way).
    Mean/std default to ViT's 0.5 for each of `config.num_channels`; extra kwargs go to the processor.
    """
    if importlib.util.find_spec("torchvision") is not None:
        from transformers import ViTImageProcessor as processor_cls
    else:
        from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil as processor_cls
    options = dict(size={"height": config.image_size, "width": config.image_size}, do_resize=True, **kwargs)
    # ViT's 0.5 per channel, sized to `num_channels` (a 3-value default cannot normalise a grayscale image).
    options["image_mean"] = list(image_mean) if image_mean is not None else [0.5] * config.num_channels
    options["image_std"] = list(image_std) if image_std is not None else [0.5] * config.num_channels
    return processor_cls(**options)


class HfAttentionPatchEmbeddings(nn.Module):
    """Non-overlapping patches: Conv2d(num_channels, hidden, kernel = stride = patch_size), flattened row-major."""

    def __init__(self, config: HfAttentionConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.num_channels = config.num_channels
        self.projection = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, (H / p) * (W / p), hidden]."""
        return self.projection(pixel_values).flatten(2).transpose(1, 2)


class HfAttentionVisionEmbeddings(nn.Module):
    """Patch embeddings, the [CLS] token (pooling="cls") and the absolute 2-D positions."""

    def __init__(self, config: HfAttentionConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.grid_size = config.image_size // config.patch_size
        self.num_prefix_tokens = 1 if config.pooling == "cls" else 0
        self.patch_embeddings = HfAttentionPatchEmbeddings(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size)) if self.num_prefix_tokens else None
        positions = positional_encoding_class(config.position_embedding_type)
        self.position_embeddings = (
            positions.grid_form(config, self.num_prefix_tokens) if positions.adds_to_embeddings else None
        )
        self.layer_norm = (
            nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.norm_position == "post" else None
        )
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def interpolate_pos_encoding(self, grid_height: int, grid_width: int) -> torch.Tensor:
        """The learned table for another grid: the patch part resampled bicubically (transformers' ViT).

        Returned unchanged at the native grid, so `interpolate_pos_encoding=True` there is the plain forward.
        """
        return self.position_embeddings.table((grid_height, grid_width))

    def forward(
        self, pixel_values: torch.Tensor, position_ids: torch.Tensor, grid: tuple[int, int],
        interpolate_pos_encoding: bool = False,
    ) -> torch.Tensor:
        embeddings = self.patch_embeddings(pixel_values)
        if self.cls_token is not None:
            embeddings = torch.cat((self.cls_token.expand(embeddings.shape[0], -1, -1), embeddings), dim=1)
        if self.position_embeddings is not None:
            table = self.position_embeddings.grid_embedding(position_ids, grid, interpolate_pos_encoding)
            embeddings = embeddings + table.to(embeddings.dtype)
        if self.layer_norm is not None:
            embeddings = self.layer_norm(embeddings)
        return self.dropout(embeddings)


class HfAttentionVisionPreTrainedModel(HfAttentionPreTrainedModel):
    """Vision models: pixel input, ViT-style init of the new parameters, image processor saved alongside."""

    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["HfAttentionVisionEmbeddings", "HfAttentionLayer"]

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, HfAttentionVisionEmbeddings):
            if module.cls_token is not None:
                init.trunc_normal_(module.cls_token, mean=0.0, std=std)
            if isinstance(module.position_embeddings, LearnedPositionTable2D):
                init.trunc_normal_(module.position_embeddings.weight, mean=0.0, std=std)
        elif isinstance(module, HfAttentionPatchEmbeddings):
            init.normal_(module.projection.weight, mean=0.0, std=std)
            init.zeros_(module.projection.bias)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Also writes `make_image_processor(config)` unless the folder already has a processor, so
        `pipeline("image-classification", model=folder)` and `model.push_to_hub(repo)` work out of the box.

        (With `save_pretrained(..., push_to_hub=True)` the upload happens inside transformers' save, before
        the processor is written: use `push_to_hub()`, or save the processor first and push it yourself.)
        """
        result = super().save_pretrained(save_directory, *args, **kwargs)
        is_main_process = args[0] if args else kwargs.get("is_main_process", True)
        if is_main_process and not os.path.exists(os.path.join(save_directory, IMAGE_PROCESSOR_FILE)):
            make_image_processor(self.config).save_pretrained(save_directory)
        return result


class HfAttentionVisionModel(HfAttentionStackMixin, HfAttentionVisionPreTrainedModel):
    """The headless encoder: pixels -> patch states; `pooler_output` is [CLS] or the mean over patches."""

    def __init__(self, config: HfAttentionConfig):
        super().__init__(config)
        self.embeddings = HfAttentionVisionEmbeddings(config)
        self.layers = nn.ModuleList([HfAttentionLayer(config, i) for i in range(config.num_hidden_layers)])
        self.final_layer_norm = (
            nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.norm_position == "pre" else None
        )
        positions = positional_encoding_class(config.position_embedding_type)
        encoding = None if positions.adds_to_embeddings else positions.grid_form(config, self.num_prefix_tokens)
        self.rotary_emb = encoding if positions.rotates_queries_and_keys else None
        self.score_bias = encoding if positions.provides_score_bias else None
        self._grid_patterns: dict[tuple[int, int], SparsePattern] = {}
        self.gradient_checkpointing = False
        self.post_init()

    @property
    def num_prefix_tokens(self) -> int:
        return self.embeddings.num_prefix_tokens

    def get_input_embeddings(self) -> HfAttentionPatchEmbeddings:
        return self.embeddings.patch_embeddings

    def grid_pattern(self, grid_height: int, grid_width: int) -> SparsePattern | None:
        """The sparse pattern of this grid (one object per grid size, so its layouts and masks are cached)."""
        if self.config.sparse_pattern is None:
            return None
        key = (grid_height, grid_width)
        if key not in self._grid_patterns:
            self._grid_patterns[key] = pattern_from_config(
                self.config, grid=(grid_height, grid_width, self.num_prefix_tokens)
            )
        return self._grid_patterns[key]

    def attention_inputs(
        self, position_ids: torch.Tensor, grid: tuple[int, int], key_padding_mask: torch.Tensor | None = None
    ) -> AttentionInputs:
        """What every layer shares for one forward: 2-D ids, axial rotary tables, 2-D bias, grid pattern.

        The grid pattern is read from the 2-D ids, so tokens keep their pattern wherever they sit in the
        sequence (``key_padding_mask``, bool [B, L], True = real, marks extra padding slots).
        """
        rotary = self.rotary_emb.rotary_tables(position_ids) if self.rotary_emb is not None else None
        return AttentionInputs(
            q_positions=position_ids,
            k_positions=position_ids,
            key_padding_mask=key_padding_mask,
            rotary=rotary,
            rotary_keys=rotary,
            positions=self.score_bias,
            pattern=self.grid_pattern(*grid),
            share_bias=not _checkpointing(self),
        )

    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
            Images; height and width must be multiples of `patch_size`.
        interpolate_pos_encoding (`bool`, *optional*):
            Resample a learned position table to this image size (other positional types need nothing).
        """
        if pixel_values is None:
            raise ValueError("pixel_values is required.")
        if pixel_values.dim() != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"pixel_values must be [batch, {self.config.num_channels}, height, width] "
                f"(num_channels={self.config.num_channels}), got shape {tuple(pixel_values.shape)}."
            )
        height, width = pixel_values.shape[-2:]
        p = self.config.patch_size
        if height % p or width % p:
            raise ValueError(f"Image size {height}x{width} is not a multiple of patch_size={p}.")
        grid = (height // p, width // p)
        pixel_values = pixel_values.to(self.embeddings.patch_embeddings.projection.weight.dtype)
        position_ids = grid_position_ids(*grid, self.num_prefix_tokens, device=pixel_values.device)
        hidden_states = self.embeddings(pixel_values, position_ids, grid, bool(interpolate_pos_encoding))
        inputs = self.attention_inputs(position_ids, grid)
        hidden_states = self._run_layers(hidden_states, inputs, output_attentions=kwargs.get("output_attentions"))
        pooled = pool_hidden_states(hidden_states, None, self.config.pooling)  # [CLS], or the mean over patches
        return BaseModelOutputWithPooling(last_hidden_state=hidden_states, pooler_output=pooled)


class HfAttentionForImageClassification(HfAttentionVisionPreTrainedModel):
    """Vision encoder + linear classifier on the pooled state (ViT's head, so ViT weights map one to one)."""

    def __init__(self, config: HfAttentionConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = HfAttentionVisionModel(config)
        self.dropout = nn.Dropout(config.classifier_dropout or 0.0)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ImageClassifierOutput:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Class ids, or floats for regression / multi-label; the loss follows `config.problem_type` (inferred
            as transformers does when unset).
        """
        outputs = self.model(
            pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, return_dict=True, **kwargs
        )
        logits = self.classifier(self.dropout(outputs.pooler_output))
        loss = classification_loss(self.config, logits, labels) if labels is not None else None
        return ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


__all__ = [
    "HfAttentionForImageClassification",
    "HfAttentionVisionModel",
    "HfAttentionVisionPreTrainedModel",
    "make_image_processor",
]
