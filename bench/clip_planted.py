"""Benchmark hook: zero-shot segmentation with a CLIP-form teacher whose artifacts are planted
by construction (`vit_clip_dense_planted_tiny_patch8`, random weights).

`zeroshot_planted(workdir)` distills a student from it on 24 sample photographs (150 steps),
then scores teacher and student by zero-shot segmentation on the generated labeled set's val
images, which no stage trained on. Random weights have no text tower that knows the classes, so
the class embeddings are the teacher's mean feature per class on the labeled set's train split
(planted cells left out): a stand-in text encoder fitted to the teacher, not to the student.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.config import load_config
from pipeline.evaluation.labeled import LabeledSet, load_item, open_labeled, write_labeled_sample
from pipeline.evaluation.zeroshot import save_class_embeddings
from pipeline.models.vit import load_teacher, patch_features
from stages import distill, evaluate, export, shard, teacher_cache

SIZE = 96  # the teacher's input: zero-shot windows of exactly this size


def normalised(img: Image.Image, model) -> torch.Tensor:
    cfg = model.pretrained_cfg
    x = torch.from_numpy(np.asarray(img.resize((SIZE, SIZE)), dtype=np.float32) / 255.0)
    return ((x - torch.tensor(cfg["mean"])) / torch.tensor(cfg["std"])).permute(2, 0, 1)[None]


def patch_labels(mask: np.ndarray, grid: int) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.fromarray(mask.astype(np.uint8)).resize((grid, grid), Image.NEAREST))).flatten().long()


def class_prototypes(model, labeled: LabeledSet, skip_cells: list[int]) -> torch.Tensor:
    """(C, D) unit mean feature of each class over the train split, `skip_cells` left out."""
    grid = SIZE // model.patch_embed.patch_size[0]
    sums = torch.zeros(len(labeled.classes), model.feature_dim)
    for item in labeled.with_masks("train"):
        img, mask, _ = load_item(item, labeled)
        labels = patch_labels(mask, grid)
        with torch.no_grad():
            f = F.normalize(patch_features(model, normalised(img, model))[0], dim=-1).reshape(grid * grid, -1)
        keep = labels != labeled.ignore_index
        keep[skip_cells] = False
        sums.index_add_(0, labels[keep], f[keep])
    return F.normalize(sums, dim=-1)


def config(root: str, labeled: str, embeddings: str):
    return load_config([], {
        "storage.run_root": root, "shard.sample_size": 24, "shard.shard_size": 8,
        "teacher.model": "vit_clip_dense_planted_tiny_patch8", "teacher.img_size": SIZE, "tta.counts": 10,
        "cache.batch_images": 4, "student.name": "clip-planted-r4", "student.registers": 4,
        "distill.epochs": 40, "distill.batch_size": 8, "distill.num_workers": 1, "distill.lr": 1e-3,
        "distill.final_lr": 5e-5, "distill.checkpoint_every": 1000, "distill.log_every": 40,
        "evaluate.num_images": 4, "evaluate.images_per_task": 32,
        "evaluate.zeroshot": {"labeled": labeled, "embeddings": embeddings, "short_side": SIZE, "crop": SIZE, "stride": 32},
    })


def zeroshot_planted(workdir: str) -> dict:
    root = os.path.abspath(workdir)
    labeled_url = write_labeled_sample(os.path.join(root, "labeled"))
    embeddings = os.path.join(root, "classes.safetensors")
    cfg = config(root, labeled_url, embeddings)
    for stage in (shard, teacher_cache, distill, export):
        stage.run(cfg)
    teacher = load_teacher(cfg.teacher)
    labeled = open_labeled(labeled_url)
    save_class_embeddings(embeddings, class_prototypes(teacher, labeled, teacher.plant_index.tolist()),
                          list(range(len(labeled.classes))))
    z = evaluate.run(cfg)["zeroshot"]["models"]
    return {f"zeroshot_miou_{name}": round(z[name]["miou"], 4) for name in ("teacher", "student")}
