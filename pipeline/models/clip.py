"""CLIP image towers with dense features in the joint image-text space, as timm models.

A CLIP ViT's patch tokens are not used for zero-shot segmentation as they come out of the
last block: training-free methods replace that block. PH-Reg's CLIP recipe uses two:

- teacher (`dense_block="naclip"`, NACLIP, Hajimiri et al. 2025, reduced form): the last
  block's attention with key-key similarity plus a Gaussian neighbourhood term on the patch
  grid, `softmax(k k^T * scale + exp(-d^2 / (2 sigma^2)))`, value then output projection, and
  neither residual nor feed-forward;
- student (`dense_block="value"`, MaskCLIP, Zhou et al. 2022): value then output projection
  of the normed input, no residual, no feed-forward.

Either output goes through the final LayerNorm (CLIP's `ln_post`) and the image projection
(`proj`, no bias), so every token is a vector in the space of the text embeddings. The
replaced block keeps the parameters of a timm `Block` (same state-dict keys, the unused
feed-forward included), so teacher and student share one checkpoint layout and the student
is built from the teacher by the usual conversion (`pipeline.models.vit.build_student`).
The class is a timm `VisionTransformer` subclass registered with timm; its arguments are
recorded by timm's factory, so an exported student rebuilds with
`timm.create_model('local-dir:...')`. A model built with registers uses the value block:
that is the recipe (`STUDENT_KWARGS`).

Position embeddings are resampled to another grid at two places: when weights for another grid
load (timm's openai ViT-B/16 is 14x14, the recipe's 448 px are 28x28) and at run time under
`dynamic_img_size` (the zero-shot windows, 336 px: 21x21). timm resamples with antialiased
bicubic; NACLIP, whose teacher and windows the recipe follows, calls
`F.interpolate(mode="bicubic", align_corners=False)` without antialiasing (the authors' CLIP code
is not in their public repository, which holds DINOv2_full only).
This class resamples as they do in both places (`pos_embed_antialias=False`, the default: the
class is the recipe's); `pos_embed_antialias=True` gives timm's. The two differ whichever way
the grid changes: PyTorch's antialiased bicubic uses PIL's cubic kernel (a = -0.5) and widens it
when shrinking, the plain one Keys' kernel (a = -0.75) at any scale. (NACLIP's resampling also
maps sample positions by `scale_factor=(n + 0.1) / N`, DINO's offset, and resamples the
teacher's 14x14 straight to each window's grid; neither is reproduced: see docs/clip-zeroshot.md.)
"""
from __future__ import annotations

import math
import re
from functools import partial

import timm
import torch
from timm.layers import LayerNorm, resample_abs_pos_embed
from timm.models import build_model_with_cfg, register_model
from timm.models.vision_transformer import Block, VisionTransformer, _cfg, checkpoint_filter_fn
from torch import nn

from pipeline.models.planted import PlantedVisionTransformer

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DENSE_BLOCKS = ("naclip", "value", "none")
# In patches: NACLIP's published default. Not tuned here (no CLIP weights offline); docs/clip-zeroshot.md lists it
# among the values the authors' code leaves open.
GAUSSIAN_STD = 5.0


def neighbourhood(grid: tuple[int, int], std: float) -> torch.Tensor:
    """(gh*gw, gh*gw) Gaussian of the distance between patch cells, peak 1 on the diagonal."""
    gh, gw = grid
    yy, xx = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    pos = torch.stack([yy.flatten(), xx.flatten()], -1).float()
    return torch.exp(-torch.cdist(pos, pos).square() / (2 * std**2))


class DenseBlock(Block):
    """A timm `Block` whose forward is a training-free dense-prediction block (see module doc).
    `grid` (patch rows, columns) and `prefix` (tokens before the patches) are set by the model
    before each forward."""

    def __init__(self, *args, mode: str = "value", gaussian_std: float = GAUSSIAN_STD, **kwargs):
        super().__init__(*args, **kwargs)
        self.mode, self.gaussian_std = mode, gaussian_std
        self.grid, self.prefix = (0, 0), 0

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        attn = self.attn
        b, n, d = x.shape
        qkv = attn.qkv(self.norm1(x)).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        v = qkv[2]
        if self.mode == "naclip":
            k = attn.k_norm(qkv[1])
            logits = (k * attn.scale) @ k.transpose(-2, -1)
            p = self.prefix
            omega = neighbourhood(self.grid, self.gaussian_std).to(logits)
            logits[..., p:, p:] = logits[..., p:, p:] + omega
            v = logits.softmax(-1) @ v
        return attn.proj(v.transpose(1, 2).reshape(b, n, d))


class ClipDenseVisionTransformer(VisionTransformer):
    """CLIP image tower: timm's CLIP ViT (pre-norm, class token) with a dense last block and
    the image projection applied to every token."""

    STUDENT_KWARGS = {"dense_block": "value"}

    def __init__(self, *args, reg_tokens: int = 0, dense_block: str = "naclip", gaussian_std: float = GAUSSIAN_STD,
                 proj_dim: int = 512, pos_embed_antialias: bool = False, **kwargs):
        super().__init__(*args, reg_tokens=reg_tokens, **kwargs)
        self.pos_embed_antialias = pos_embed_antialias  # read by `_pos_embed` and by `clip_filter_fn` at load
        if dense_block not in DENSE_BLOCKS:
            raise ValueError(f"dense_block must be one of {DENSE_BLOCKS}, got {dense_block!r}")
        self.dense_block = dense_block
        self.feature_dim = proj_dim
        self.proj = nn.Linear(self.embed_dim, proj_dim, bias=False)
        if dense_block != "none":
            old = self.blocks[-1]
            new = DenseBlock(self.embed_dim, old.attn.num_heads, mode=dense_block, gaussian_std=gaussian_std,
                             qkv_bias=old.attn.qkv.bias is not None, mlp_ratio=old.mlp.fc1.out_features / self.embed_dim,
                             norm_layer=type(old.norm1), act_layer=type(old.mlp.act))
            new.norm1.eps = new.norm2.eps = old.norm1.eps
            # A random-init model keeps PyTorch's default initialisation here (larger than timm's), on
            # which the planted-artifact construction's numbers were measured; pretrained weights replace it.
            self.blocks[-1] = new

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """timm's `_pos_embed`, resampling for another input size with `pos_embed_antialias`
        (timm's always antialiases)."""
        if not self.dynamic_img_size or self.pos_embed is None or self.pos_embed_antialias:
            return super()._pos_embed(x)
        b, h, w, c = x.shape
        pos_embed = resample_abs_pos_embed(self.pos_embed, new_size=(h, w), old_size=self.patch_embed.grid_size,
                                           num_prefix_tokens=0 if self.no_embed_class else self.num_prefix_tokens,
                                           antialias=False)
        x = x.reshape(b, h * w, c)
        prefix = [t.expand(b, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if self.no_embed_class:  # the prefix tokens have no position term
            x = torch.cat(prefix + [x + pos_embed], dim=1)
        else:  # pos_embed starts with the prefix tokens' positions
            x = torch.cat(prefix + [x], dim=1) + pos_embed
        return self.pos_drop(x)

    def forward_features(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if self.dense_block != "none":
            ph, pw = self.patch_embed.patch_size
            self.blocks[-1].grid = (x.shape[-2] // ph, x.shape[-1] // pw)
            self.blocks[-1].prefix = self.num_prefix_tokens
        return self.proj(super().forward_features(x, attn_mask=attn_mask, is_causal=is_causal))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.pool(x)


def clip_filter_fn(state: dict, model: ClipDenseVisionTransformer) -> dict:
    """timm's CLIP checkpoints (image projection as `head.weight`, OpenAI layouts converted by
    timm) -> this class: the projection becomes `proj.weight`; a position embedding for another
    grid is resampled as the model's `pos_embed_antialias` says (module docstring)."""
    state = dict(state)
    if "head.weight" in state and "proj.weight" not in state:
        state["proj.weight"] = state.pop("head.weight")
    state.pop("head.bias", None)
    return checkpoint_filter_fn(state, model, antialias=getattr(model, "pos_embed_antialias", True))


def _create(name: str, pretrained: bool, args: dict, kwargs: dict) -> ClipDenseVisionTransformer:
    return build_model_with_cfg(ClipDenseVisionTransformer, name, pretrained, pretrained_filter_fn=clip_filter_fn,
                                **dict(args, **kwargs))


default_cfgs = {
    "vit_clip_dense_base_patch16": _cfg(
        hf_hub_id="timm/vit_base_patch16_clip_224.openai", input_size=(3, 448, 448), num_classes=0,
        mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, interpolation="bicubic", crop_pct=1.0, license="mit"),
    "vit_clip_dense_tiny_patch8": _cfg(url="", input_size=(3, 64, 64), num_classes=0, mean=OPENAI_CLIP_MEAN,
                                       std=OPENAI_CLIP_STD, license="none"),
}


@register_model
def vit_clip_dense_base_patch16(pretrained: bool = False, **kwargs) -> ClipDenseVisionTransformer:
    """OpenAI CLIP ViT-B/16 image tower at 448 px with a dense last block; pretrained weights
    are timm's `vit_base_patch16_clip_224.openai` (position embedding resampled 14x14 -> 28x28)."""
    args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, pre_norm=True, img_size=448,
                norm_layer=partial(LayerNorm, eps=1e-5), act_layer="quick_gelu", proj_dim=512)
    return _create("vit_clip_dense_base_patch16", pretrained, args, kwargs)


@register_model
def vit_clip_dense_tiny_patch8(pretrained: bool = False, **kwargs) -> ClipDenseVisionTransformer:
    """The same architecture, small (depth 3, width 64, patch 8, 64 px) for tests; features in a
    512-d space, so that a CLIP-B text tower (seeded random offline) fits them."""
    args = dict(patch_size=8, embed_dim=64, depth=3, num_heads=4, pre_norm=True, img_size=64,
                norm_layer=partial(LayerNorm, eps=1e-5), act_layer="quick_gelu", proj_dim=512)
    return _create("vit_clip_dense_tiny_patch8", pretrained, args, kwargs)


# --- the authors' released distilled CLIP students ---------------------------------------------

def convert_phreg_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The authors' student state dict (OpenAI CLIP layout under `vit.`, registers as
    `register_tokens` (R, D), position embedding at the training resolution covering the class
    token) -> the state dict of a `ClipDenseVisionTransformer` student built with
    `reg_tokens=R, no_embed_class=True, dense_block="value"`. The class position is folded into
    the class token, which is exact because the class token has no other position term."""
    out = {}
    swaps = [(r"^conv1\.", "patch_embed.proj."), (r"^ln_pre\.", "norm_pre."), (r"^ln_post\.", "norm."),
             (r"^transformer\.resblocks\.", "blocks."), (r"\.ln_(\d)\.", r".norm\1."), (r"\.attn\.in_proj_", ".attn.qkv."),
             (r"\.attn\.out_proj\.", ".attn.proj."), (r"\.mlp\.c_fc\.", ".mlp.fc1."), (r"\.mlp\.c_proj\.", ".mlp.fc2.")]
    for key, value in state.items():
        if key == "register_tokens":
            out["reg_token"] = value.reshape(1, *value.shape[-2:])
            continue
        if not key.startswith("vit."):
            raise ValueError(f"unexpected key {key!r} in a PH-Reg CLIP student state dict")
        key = key[len("vit."):]
        if key == "class_embedding":
            out["cls_token"] = value.reshape(1, 1, -1)
        elif key == "positional_embedding":
            out["pos_embed"] = value.reshape(1, -1, value.shape[-1])
        elif key == "proj":
            out["proj.weight"] = value.t().contiguous()
        else:
            for pattern, repl in swaps:
                key = re.sub(pattern, repl, key)
            out[key] = value
    pos = out.pop("pos_embed")
    out["cls_token"] = out["cls_token"] + pos[:, :1]
    out["pos_embed"] = pos[:, 1:]
    side = math.isqrt(out["pos_embed"].shape[1])
    if side * side != out["pos_embed"].shape[1]:
        raise ValueError(f"position embedding of {out['pos_embed'].shape[1]} patches is not a square grid")
    return out


def phreg_clip_student(state: dict[str, torch.Tensor], model: str = "vit_clip_dense_base_patch16",
                       **kwargs) -> ClipDenseVisionTransformer:
    """A timm student (`model`, ViT-B/16 by default) holding the authors' released weights, at
    the resolution of their position embedding."""
    converted = convert_phreg_clip(state)
    side = math.isqrt(converted["pos_embed"].shape[1])
    patch = converted["patch_embed.proj.weight"].shape[-1]
    student = timm.create_model(model, img_size=side * patch, reg_tokens=converted["reg_token"].shape[1],
                                no_embed_class=True, dense_block="value", num_classes=0, **kwargs)
    student.load_state_dict(converted, strict=True)
    return student.eval()


# --- a CLIP-form teacher with artifacts planted by construction --------------------------------

class PlantedClipDenseVisionTransformer(ClipDenseVisionTransformer, PlantedVisionTransformer):
    """`ClipDenseVisionTransformer` with the planted artifacts of `pipeline.models.planted`
    (fixed high-norm vectors added to the residual stream before the last block at a few
    cells, switched by the position embedding): the dense last block turns them into corrupted
    joint-space features at those cells, as real artifact tokens corrupt CLIP's dense features."""


default_cfgs["vit_clip_dense_planted_tiny_patch8"] = _cfg(url="", input_size=(3, 96, 96), num_classes=0,
                                                          mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, license="none")


@register_model
def vit_clip_dense_planted_tiny_patch8(pretrained: bool = False, **kwargs) -> PlantedClipDenseVisionTransformer:
    """CLIP form (pre-norm, quick-GELU, dense last block, projection to 64-d) of the planted
    teacher: depth 4, width 96, patch 8, 96 px, artifacts at 3 cells of the 12x12 grid."""
    args = dict(patch_size=8, embed_dim=96, depth=4, num_heads=3, pre_norm=True, img_size=96,
                norm_layer=partial(LayerNorm, eps=1e-5), act_layer="quick_gelu", proj_dim=64)
    return build_model_with_cfg(PlantedClipDenseVisionTransformer, "vit_clip_dense_planted_tiny_patch8", pretrained,
                                pretrained_filter_fn=clip_filter_fn, **dict(args, **kwargs))
