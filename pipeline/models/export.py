"""timm hub format: a folder with `config.json` + `model.safetensors`, as timm writes it.

`timm.create_model('local-dir:<folder>', pretrained=True)` rebuilds the student with its
registers; the same folder can be uploaded to a model hub as it is. A student narrower
than its teacher also has `projection.safetensors` (`weight` (D_teacher, D_student), `bias`):
its teacher-space features are `patch_tokens @ weight.T + bias`.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager

import safetensors.torch
import timm
import torch
from timm.models._hub import save_for_hf
from torch import nn

from pipeline.models.vit import PatchFeatures
from pipeline.storage import local_path, url_to_fs

PROVENANCE = "phreg.json"


PROJECTION = "projection.safetensors"


def write_folder(model: nn.Module, folder: str, provenance: dict, projection: nn.Linear | None = None) -> None:
    save_for_hf(model, folder, safe_serialization=True)
    if projection is not None:
        safetensors.torch.save_file({k: v.detach().contiguous() for k, v in projection.state_dict().items()},
                                    os.path.join(folder, PROJECTION))
    with open(os.path.join(folder, PROVENANCE), "w") as f:
        json.dump(provenance, f, indent=1, sort_keys=True)


def max_output_difference(a: nn.Module, b: nn.Module, seed: int = 0) -> float:
    """Largest absolute difference of patch features (timm models, or `PatchFeatures` with
    their projection) on a random input."""
    a, b = (m if isinstance(m, PatchFeatures) else PatchFeatures(m) for m in (a, b))
    h, w = a.model.patch_embed.img_size
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        return (a.eval()(x) - b.eval()(x)).abs().max().item()


def upload(folder: str, url: str, storage_options=None) -> None:
    fs, path = url_to_fs(url, storage_options)
    fs.makedirs(path, exist_ok=True)
    for name in os.listdir(folder):
        fs.put_file(os.path.join(folder, name), f"{path.rstrip('/')}/{name}")


@contextmanager
def local_copy(url: str, storage_options=None):
    """A local folder with the contents of `url` (the folder itself when it is local)."""
    path = local_path(url)
    if path is not None:
        yield path
        return
    fs, remote = url_to_fs(url, storage_options)
    tmp = tempfile.mkdtemp(prefix="phreg-export-")
    try:
        for entry in fs.ls(remote, detail=False):
            fs.get_file(entry, os.path.join(tmp, entry.rstrip("/").rsplit("/", 1)[-1]))
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_exported(url: str, storage_options=None) -> nn.Module:
    """A model from an export folder (local or remote) through timm's own loader."""
    return load_exported_features(url, storage_options).model


def load_exported_features(url: str, storage_options=None) -> PatchFeatures:
    """The exported model with its projection, if any: teacher-space patch features."""
    with local_copy(url, storage_options) as folder:
        model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        projection = None
        if os.path.exists(os.path.join(folder, PROJECTION)):
            weights = safetensors.torch.load_file(os.path.join(folder, PROJECTION))
            projection = nn.Linear(*reversed(weights["weight"].shape))
            projection.load_state_dict(weights)
        return PatchFeatures(model, projection).eval()
