"""Attention maps and the per-head summaries papers plot: attention entropy and mean attention distance.

`attention_maps(model, inputs)` works for every model of the family and for transformers' own models: it asks
for `output_attentions=True` and, where the kernel in use returns no weights (SDPA, FlexAttention), runs the
forward again in `eager` and puts the kernel back. Sparse maps keep their exact zeros outside the pattern.

Summaries (per layer and head, averaged over the real query tokens of the batch):
- entropy, in nats, of each query's distribution over keys (rows are renormalised first, so a scoring function
  whose weights do not sum to one still gets a distribution);
- mean attention distance (Dosovitskiy et al. 2021, fig. 7): the attention-weighted distance between a query and
  its keys, in tokens for text (from the position ids, so padding moves nothing) and in pixels between patch
  centres for vision (patch queries and keys only: the prefix token has no place on the grid, and the weights
  are renormalised over the patch keys).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

STACKS = ("encoder", "decoder", "cross")


@dataclass
class AttentionMaps:
    """Per-stack, per-layer attention weights `[B, H, Lq, Lk]` (float32, on the CPU) and what places them."""

    attentions: dict[str, list[torch.Tensor]]
    query_mask: dict[str, torch.Tensor | None] = field(default_factory=dict)  # [B, Lq] True = real token
    key_mask: dict[str, torch.Tensor | None] = field(default_factory=dict)  # [B, Lk]
    distances: dict[str, torch.Tensor | None] = field(default_factory=dict)  # [B|1, Lq, Lk], None: not placed
    tokens: list[list[str]] | None = None  # text: one list of token strings per example
    grid: tuple[int, int] | None = None  # vision: patch grid (rows, cols)
    num_prefix_tokens: int = 0

    @property
    def stacks(self) -> list[str]:
        return [name for name in STACKS if self.attentions.get(name)]

    def summaries(self) -> dict[str, dict[str, torch.Tensor]]:
        """{stack: {"entropy": [L, H], "distance": [L, H] (NaN where not defined)}}."""
        out = {}
        for stack in self.stacks:
            rows_e, rows_d = [], []
            for attn in self.attentions[stack]:
                rows_e.append(attention_entropy(attn, self.query_mask.get(stack), self.key_mask.get(stack)))
                dist = self.distances.get(stack)
                rows_d.append(
                    torch.full((attn.shape[1],), math.nan)
                    if dist is None
                    else mean_attention_distance(attn, dist, self._distance_query_mask(stack), self._key_weight(stack))
                )
            out[stack] = {"entropy": torch.stack(rows_e), "distance": torch.stack(rows_d)}
        return out

    def _distance_query_mask(self, stack: str) -> torch.Tensor | None:
        return self._patches_only(self.query_mask.get(stack), self.attentions[stack][0].shape[2])

    def _key_weight(self, stack: str) -> torch.Tensor | None:
        return self._patches_only(self.key_mask.get(stack), self.attentions[stack][0].shape[3])

    def _patches_only(self, mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
        """Vision: the prefix token has no place on the grid, so distances count patch tokens only."""
        if self.grid is None or not self.num_prefix_tokens:
            return mask
        batch = self.attentions["encoder"][0].shape[0]
        patch = torch.ones(batch, length, dtype=torch.bool)
        patch[:, : self.num_prefix_tokens] = False
        return patch if mask is None else patch & mask


def attention_entropy(
    attn: torch.Tensor, query_mask: torch.Tensor | None = None, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """[B, H, Lq, Lk] -> [H]: mean over real queries of -sum_k p log p (nats), rows renormalised over real keys."""
    p = attn.float()
    if key_mask is not None:
        p = p * key_mask[:, None, None, :].to(p.dtype)
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-12)
    ent = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)  # [B, H, Lq]
    return _mean_over_queries(ent, query_mask)


def mean_attention_distance(
    attn: torch.Tensor, distances: torch.Tensor, query_mask: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """[B, H, Lq, Lk] weights, [B|1, Lq, Lk] distances -> [H]: mean over real queries of sum_k p_qk d_qk."""
    p = attn.float()
    if key_mask is not None:
        p = p * key_mask[:, None, None, :].to(p.dtype)
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-12)
    dist = (p * distances[:, None].float()).sum(-1)  # [B, H, Lq]
    return _mean_over_queries(dist, query_mask)


def _mean_over_queries(values: torch.Tensor, query_mask: torch.Tensor | None) -> torch.Tensor:
    if query_mask is None:
        return values.mean(dim=(0, 2))
    w = query_mask[:, None, :].to(values.dtype)
    return (values * w).sum(dim=(0, 2)) / w.sum(dim=(0, 2)).clamp_min(1.0)


def token_distances(position_ids: torch.Tensor) -> torch.Tensor:
    """[B|1, L] position ids -> [B|1, L, L] |pos_q - pos_k|."""
    position_ids = position_ids.long()
    return (position_ids[:, :, None] - position_ids[:, None, :]).abs().float()


def patch_distances(grid: tuple[int, int], patch_size: int, num_prefix_tokens: int = 0) -> torch.Tensor:
    """[1, P + R*C, P + R*C] Euclidean pixel distance between patch centres (0 for the prefix tokens)."""
    rows, cols = grid
    r = torch.arange(rows).repeat_interleave(cols).float()
    c = torch.arange(cols).repeat(rows).float()
    d = torch.sqrt((r[:, None] - r[None]) ** 2 + (c[:, None] - c[None]) ** 2) * patch_size
    n = num_prefix_tokens + rows * cols
    full = torch.zeros(n, n)
    full[num_prefix_tokens:, num_prefix_tokens:] = d
    return full[None]


def _weights(outputs, name: str) -> list[torch.Tensor] | None:
    value = getattr(outputs, name, None)
    if value is None:
        return None
    value = list(value)
    if not value or any(a is None for a in value):
        return None
    return [a.detach().float().cpu() for a in value]


def _run(model, inputs: dict) -> dict[str, list[torch.Tensor] | None]:
    with torch.no_grad():
        outputs = model(**inputs, output_attentions=True, return_dict=True)
    if getattr(outputs, "encoder_attentions", None) is not None or getattr(outputs, "cross_attentions", None):
        return {
            "encoder": _weights(outputs, "encoder_attentions"),
            "decoder": _weights(outputs, "decoder_attentions"),
            "cross": _weights(outputs, "cross_attentions"),
        }
    return {"encoder": _weights(outputs, "attentions")}


def _is_decoder_only(model) -> bool:
    config = model.config
    return not getattr(config, "is_encoder_decoder", False) and model.__class__.__name__.endswith("ForCausalLM")


def attention_maps(model, inputs: dict, layers: list[int] | None = None) -> AttentionMaps:
    """Per-layer, per-head attention weights of `model` on `inputs` (a dict of model inputs), for every backend.

    `layers` keeps only those layer indices (negative ones count from the end). Decoder-only models report their
    stack under "decoder"; encoder-decoders under "encoder", "decoder" and "cross".
    """
    was_training = model.training
    model.eval()
    try:
        maps = _run(model, inputs)
        if any(v is None for k, v in maps.items() if k != "cross" or maps.get("decoder") is not None):
            impl = getattr(model.config, "_attn_implementation", None)
            if impl == "eager":
                raise ValueError(f"{type(model).__name__} returned no attention weights even in eager mode.")
            model.set_attn_implementation("eager")
            try:
                maps = _run(model, inputs)
            finally:
                model.set_attn_implementation(impl)
    finally:
        model.train(was_training)
    if _is_decoder_only(model):
        maps = {"decoder": maps["encoder"]}
    maps = {k: v for k, v in maps.items() if v}
    if layers is not None:
        maps = {k: [v[i] for i in layers] for k, v in maps.items()}

    result = AttentionMaps(attentions=maps)
    pixel_values = inputs.get("pixel_values")
    if pixel_values is not None:
        patch = model.config.patch_size
        result.grid = (pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch)
        result.num_prefix_tokens = 1 if getattr(model.config, "pooling", "cls") == "cls" else 0
        result.distances["encoder"] = patch_distances(result.grid, patch, result.num_prefix_tokens)
        return result

    enc_mask = inputs.get("attention_mask")
    enc_mask = None if enc_mask is None else enc_mask.bool().cpu()
    enc_pos = inputs.get("position_ids")
    first = next(iter(maps.values()))[0]
    if enc_pos is None:
        enc_pos = _default_positions(enc_mask, first.shape[-1])
    if "cross" in maps:
        dec_mask = inputs.get("decoder_attention_mask")
        dec_mask = None if dec_mask is None else dec_mask.bool().cpu()
        dec_len = maps["decoder"][0].shape[-1]
        dec_pos = inputs.get("decoder_position_ids")
        dec_pos = _default_positions(dec_mask, dec_len) if dec_pos is None else dec_pos.cpu()
        result.query_mask.update(encoder=enc_mask, decoder=dec_mask, cross=dec_mask)
        result.key_mask.update(encoder=enc_mask, decoder=dec_mask, cross=enc_mask)
        result.distances.update(encoder=token_distances(enc_pos.cpu()), decoder=token_distances(dec_pos), cross=None)
    else:
        stack = next(iter(maps))
        result.query_mask[stack] = enc_mask
        result.key_mask[stack] = enc_mask
        result.distances[stack] = token_distances(enc_pos.cpu())
    return result


def _default_positions(mask: torch.Tensor | None, length: int) -> torch.Tensor:
    """Slots, as the models count positions without `position_ids` (distances between real tokens are the same
    under left or right padding)."""
    return torch.arange(length)[None]


def summaries_table(maps: AttentionMaps) -> list[dict]:
    """One row per (stack, layer, head): entropy and mean distance, plain numbers (CSV/JSON-ready)."""
    rows = []
    for stack, values in maps.summaries().items():
        entropy, distance = values["entropy"], values["distance"]
        for layer in range(entropy.shape[0]):
            for head in range(entropy.shape[1]):
                d = float(distance[layer, head])
                rows.append({
                    "stack": stack, "layer": layer, "head": head, "entropy": float(entropy[layer, head]),
                    "mean_distance": None if math.isnan(d) else d,
                })
    return rows


def model_summary_metrics(maps: AttentionMaps) -> dict[str, float]:
    """Scalars for a sweep table: the mean over layers and heads of each summary, per stack."""
    out = {}
    for stack, values in maps.summaries().items():
        out[f"attn_entropy_{stack}"] = float(values["entropy"].mean())
        d = values["distance"]
        if not torch.isnan(d).all():
            out[f"attn_distance_{stack}"] = float(d.nanmean())
    return out


def export_bertviz(maps: AttentionMaps, path: str | Path, example: int = 0) -> Path:
    """A JSON file bertviz can open: `head_view(**load_bertviz(path))` (or `model_view`).

    Text only (bertviz draws token-to-token lines); for an encoder-decoder it holds the three stacks in bertviz's
    `encoder_attention` / `decoder_attention` / `cross_attention` form.
    """
    tokens = maps.tokens[example] if maps.tokens else None

    def stack(name):
        return [a[example : example + 1].tolist() for a in maps.attentions[name]]

    if "cross" in maps.attentions:
        data = {
            "encoder_attention": stack("encoder"), "decoder_attention": stack("decoder"),
            "cross_attention": stack("cross"), "encoder_tokens": tokens,
            "decoder_tokens": (maps.tokens[example] if maps.tokens and len(maps.tokens) > 1 else None),
        }
    else:
        data = {"attention": stack(maps.stacks[0]), "tokens": tokens}
    path = Path(path)
    path.write_text(json.dumps(data))
    return path


def load_bertviz(path: str | Path) -> dict:
    """The keyword arguments of bertviz's `head_view` / `model_view` from `export_bertviz`'s file."""
    data = json.loads(Path(path).read_text())
    out = {}
    for key, value in data.items():
        if key.endswith("attention") or key == "attention":
            out[key] = tuple(torch.tensor(layer) for layer in value)
        elif value is not None:
            out[key] = value
    return out


def plot_attention_grid(
    maps: AttentionMaps, path: str | Path, stack: str | None = None, example: int = 0, max_tokens: int = 48,
) -> Path:
    """PNG: a grid of layers (rows) x heads (columns) of one stack's maps, token labels on the axes (text)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stack = stack or maps.stacks[0]
    layers = maps.attentions[stack]
    n_layers, n_heads = len(layers), layers[0].shape[1]
    fig, axes = plt.subplots(n_layers, n_heads, figsize=(2.2 * n_heads, 2.2 * n_layers), squeeze=False)
    tokens = maps.tokens[example] if maps.tokens else None
    for li, attn in enumerate(layers):
        for h in range(n_heads):
            ax = axes[li][h]
            ax.imshow(attn[example, h].numpy(), cmap="viridis", vmin=0.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if tokens and len(tokens) <= max_tokens and attn.shape[-1] == len(tokens) and li == n_layers - 1:
                ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=5)
            if tokens and len(tokens) <= max_tokens and attn.shape[-2] == len(tokens) and h == 0:
                ax.set_yticks(range(len(tokens)), tokens, fontsize=5)
            if li == 0:
                ax.set_title(f"head {h}", fontsize=8)
            if h == 0:
                ax.set_ylabel(f"layer {li}", fontsize=8)
    fig.suptitle(f"{stack} attention")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_patch_overlay(
    maps: AttentionMaps, image: torch.Tensor, path: str | Path, layer: int = -1, example: int = 0,
) -> Path:
    """PNG: the image, then per head the attention of the [CLS] token (or the mean over patch queries when there is
    no prefix token) over the patches, upsampled onto the image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if maps.grid is None:
        raise ValueError("plot_patch_overlay needs the maps of a vision model (pixel_values input).")
    attn = maps.attentions["encoder"][layer][example]  # [H, L, L]
    p = maps.num_prefix_tokens
    rows, cols = maps.grid
    heat = attn[:, 0, p:] if p else attn[:, :, :].mean(1)
    heat = heat.reshape(-1, rows, cols)
    img = image.detach().float().cpu()
    img = (img - img.min()) / (img.max() - img.min()).clamp_min(1e-6)
    img = img.permute(1, 2, 0).numpy()
    if img.shape[-1] == 1:
        img = img[..., 0]
    n = heat.shape[0] + 1
    fig, axes = plt.subplots(1, n, figsize=(2.2 * n, 2.4), squeeze=False)
    axes[0][0].imshow(img, cmap="gray" if img.ndim == 2 else None)
    axes[0][0].set_title("image", fontsize=8)
    extent = (0, img.shape[1], img.shape[0], 0)
    for h in range(heat.shape[0]):
        ax = axes[0][h + 1]
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, extent=extent)
        ax.imshow(heat[h].numpy(), cmap="inferno", alpha=0.6, extent=extent, interpolation="nearest")
        ax.set_title(f"head {h}", fontsize=8)
    for ax in axes[0]:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_summaries(maps: AttentionMaps, path: str | Path) -> Path:
    """PNG: mean attention distance and entropy against depth, one dot per head (the ViT paper's figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summaries = maps.summaries()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for stack, values in summaries.items():
        for ax, key, label in ((axes[0], "distance", "mean attention distance"), (axes[1], "entropy", "entropy")):
            v = values[key]
            if torch.isnan(v).all():
                continue
            layer_idx = torch.arange(v.shape[0])[:, None].expand_as(v)
            ax.scatter(layer_idx.flatten().numpy(), v.flatten().numpy(), s=14, label=stack)
            ax.set_xlabel("layer")
            ax.set_ylabel(label + (" (pixels)" if key == "distance" and maps.grid else
                                   " (tokens)" if key == "distance" else " (nats)"))
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = [
    "AttentionMaps",
    "attention_entropy",
    "attention_maps",
    "export_bertviz",
    "load_bertviz",
    "mean_attention_distance",
    "model_summary_metrics",
    "patch_distances",
    "plot_attention_grid",
    "plot_patch_overlay",
    "plot_summaries",
    "summaries_table",
    "token_distances",
]
