"""What more than one bench section uses: the reference teacher, its features on real
photographs, its FLOPs, and the steady rate of a distill run.

Sections import this module and `bench/run.py` imports the sections, never the reverse, so
that the bench's modules form no import circle (tests/test_bench_layout.py checks it).
"""
from __future__ import annotations

import csv
import io

import numpy as np
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.config import TeacherConfig
from pipeline.data.images import crop_box, decode_rgb
from pipeline.data.sample_corpus import generate
from pipeline.models.vit import describe_teacher, load_teacher, patch_features
from pipeline.storage import join_url, read_bytes

# The setting the figures are quoted at: DINOv2 ViT-B/14 at 518 px (37 x 37 x 768 targets).
REFERENCE = TeacherConfig(model="vit_base_patch14_dinov2", img_size=518)


def vitb_features(n: int) -> torch.Tensor:
    """Final-layer patch features of a ViT-B/14 at 518 px (37x37x768, the reference setting)
    on real photographs; random-init weights (no pretrained weights offline)."""
    pre = describe_teacher(REFERENCE).preprocess
    model = load_teacher(REFERENCE)
    images = [decode_rgb(data) for _, data in generate(n, seed=1)]
    x = torch.stack([pre(img, crop_box(img.width, img.height, pre.size, "center")) for img in images])
    with torch.inference_mode():
        return torch.cat([patch_features(model, x[i:i + 2]) for i in range(0, n, 2)])


def flops() -> dict:
    """What a GPU run is bound by: FLOPs of the teacher-cache per image for ViT-B/14 at 518 px."""
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch14_dinov2", img_size=518, num_classes=0)
        with FlopCounterMode(display=False) as counter:
            model.forward_features(torch.randn(1, 3, 518, 518))
    per_view = counter.get_total_flops()
    return {"vitb14_518_gflops_per_view": round(per_view / 1e9, 1), "vitb14_518_tflops_per_image_10_views": round(10 * per_view / 1e12, 3)}


def steady_rate(run_url: str, storage_options=None) -> tuple[float, float]:
    """(samples/s, data-wait fraction) of a run's metric rows, the first dropped (it includes
    start-up: model building, first reads, DDP set-up). Samples/s is the median over rows, so
    that a burst of load from another tenant of this shared machine does not decide a ratio."""
    rows = list(csv.DictReader(io.StringIO(read_bytes(join_url(run_url, "metrics.csv"), storage_options).decode())))[1:]
    seconds = sum(float(r["seconds"]) for r in rows)
    waited = sum(float(r["data_wait_fraction"]) * float(r["seconds"]) for r in rows)
    return float(np.median([float(r["samples_per_s"]) for r in rows])), waited / seconds
