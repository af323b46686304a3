"""The authors' released DINOv2 students as timm students.

Their checkpoints are a Hugging Face `Dinov2Model` state dict (`embeddings.*`, `encoder.layer.N.*`,
`layernorm.*`) plus a `registers` tensor of R learned tokens without a position term, as timm's
`reg_token` is. The authors put the registers before the class token (`[registers, class,
patches]`), timm after it (`[class, registers, patches]`); with no position term on either, the
blocks treat the tokens alike wherever they sit, so the order changes token indices, not outputs.
Converted, they load into the timm model this project distils (`reg_tokens=R,
no_embed_class=True`), so its evaluation runs on released weights.

Two layouts are accepted: the bare one above, and the one the authors' training script saves
(`torch.save(student.state_dict())` of DINOv2_full's `RegDINOv2Base`), which holds the HF model as
`model.*` and refers to its submodules again as `embed`, `encoder` and `layernorm`: every tensor
is in it twice, under `model.embeddings.*` and `embed.*`, `model.encoder.*` and `encoder.*`,
`model.layernorm.*` and `layernorm.*`.
"""
from __future__ import annotations

import io
import math
import re

import timm
import torch
from torch import nn

from pipeline.models.export import write_folder
from pipeline.storage import read_bytes

_SWAPS = [
    (r"^encoder\.layer\.", "blocks."),
    (r"\.attention\.output\.dense\.", ".attn.proj."),
    (r"\.layer_scale(\d)\.lambda1$", r".ls\1.gamma"),
    (r"^layernorm\.", "norm."),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
]


# The authors' wrapper: its name for a tensor -> the bare HF name (`encoder.*` and `layernorm.*`
# are the bare names already).
_WRAPPER_PREFIXES = [("model.", ""), ("embed.", "embeddings.")]


def is_wrapper_layout(state: dict[str, torch.Tensor]) -> bool:
    """Whether `state` is the authors' wrapper layout: the HF model under `model.`."""
    return any(key.startswith("model.") for key in state)


def _bare_name(key: str) -> str:
    for prefix, bare in _WRAPPER_PREFIXES:
        if key.startswith(prefix):
            return bare + key[len(prefix):]
    return key


def unwrap_phreg_dinov2(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The authors' wrapper layout (module docstring) -> the bare HF layout + `registers`. A
    tensor saved under two names must be the same under both: names that disagree mean the
    file is not what it claims to be, and either choice could be the wrong half."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        bare = _bare_name(key)
        if bare not in out:
            out[bare] = value
        elif out[bare].shape != value.shape or not torch.equal(out[bare], value):
            raise ValueError(f"{key!r} and another name of {bare!r} differ in a PH-Reg DINOv2 student state dict: "
                             "the wrapper's two names of one module must hold the same tensor")
    return out


def convert_phreg_dinov2(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF `Dinov2Model` keys + `registers` (bare, or in the authors' wrapper layout) -> the
    state dict of a timm DINOv2 ViT built with `reg_tokens=R, no_embed_class=True`. Separate
    q/k/v projections are stacked into timm's fused qkv; the class position is folded into the
    class token (exact: it has no other position term); the unused `mask_token` is dropped."""
    if is_wrapper_layout(state):
        state = unwrap_phreg_dinov2(state)
    out, qkv = {}, {}
    for key, value in state.items():
        if key == "registers":
            out["reg_token"] = value.reshape(1, -1, value.shape[-1])
        elif key == "embeddings.mask_token":
            continue
        elif key == "embeddings.cls_token":
            out["cls_token"] = value.reshape(1, 1, -1)
        elif key == "embeddings.position_embeddings":
            out["pos_embed"] = value.reshape(1, -1, value.shape[-1])
        elif m := re.match(r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$", key):
            qkv.setdefault((m[1], m[3]), {})[m[2]] = value
        else:
            new = key
            for pattern, repl in _SWAPS:
                new = re.sub(pattern, repl, new)
            if new == key:  # every key of the layout is renamed
                raise ValueError(f"unexpected key {key!r} in a PH-Reg DINOv2 student state dict")
            out[new] = value
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise ValueError(f"layer {layer} lacks {sorted({'query', 'key', 'value'} - set(parts))} {kind}")
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    if "reg_token" not in out or "pos_embed" not in out:
        raise ValueError("a PH-Reg DINOv2 student needs `registers` and `embeddings.position_embeddings`")
    pos = out.pop("pos_embed")
    out["cls_token"] = out["cls_token"] + pos[:, :1]
    out["pos_embed"] = pos[:, 1:]
    side = math.isqrt(out["pos_embed"].shape[1])
    if side * side != out["pos_embed"].shape[1]:
        raise ValueError(f"position embedding of {out['pos_embed'].shape[1]} patches is not a square grid")
    return out


def phreg_dinov2_student(state: dict[str, torch.Tensor], model: str = "vit_base_patch14_dinov2", **kwargs) -> nn.Module:
    """A timm student (`model`, ViT-B/14 by default) holding the authors' released weights, at
    the resolution of their position embedding (518 px for the published students)."""
    converted = convert_phreg_dinov2(state)
    side = math.isqrt(converted["pos_embed"].shape[1])
    patch = converted["patch_embed.proj.weight"].shape[-1]
    student = timm.create_model(model, img_size=side * patch, reg_tokens=converted["reg_token"].shape[1],
                                no_embed_class=True, num_classes=0, **kwargs)
    student.load_state_dict(converted, strict=True)
    return student.eval()


def read_released(url: str, storage_options=None) -> dict[str, torch.Tensor]:
    """A released checkpoint file (path or URL): a torch state dict, read without running code."""
    return torch.load(io.BytesIO(read_bytes(url, storage_options)), map_location="cpu", weights_only=True)


def export_phreg_dinov2(checkpoint: str, folder: str, model: str = "vit_base_patch14_dinov2", storage_options=None,
                        **kwargs) -> nn.Module:
    """The released checkpoint file (path or URL) -> a timm hub folder (local) that `evaluate`
    and `timm.create_model('local-dir:...')` load as any exported student."""
    student = phreg_dinov2_student(read_released(checkpoint, storage_options), model=model, **kwargs)
    write_folder(student, folder, {"source": "PH-Reg released DINOv2 student", "checkpoint": checkpoint})
    return student
