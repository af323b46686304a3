"""The GPU path: teacher cache, distillation and export on CUDA with bf16 autocast.

Runs only where `torch.cuda.is_available()`; elsewhere every test is skipped with that reason
(CI has no GPU). `make test` on a GPU machine runs them with the rest.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import zarr

from pipeline.config import StudentConfig
from pipeline.data.images import Preprocess
from pipeline.data.manifest import Manifest
from pipeline.data.readers import in_order
from pipeline.models.export import load_exported_features
from pipeline.models.vit import PatchFeatures, build_student, describe_teacher, load_teacher, unlock
from pipeline.targets.teacher_targets import TeacherTargets, UnitViews, view_jobs
from pipeline.training.losses import distill_loss
from pipeline.training.pairs import CachedPairs, StepBatches
from stages import distill, export, shard, teacher_cache
from tests.conftest import tiny_config

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here: the GPU tests need torch.cuda.is_available()"),
]


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory, ray_local):
    """Shards, a store computed on the CPU and one computed on the GPU (two reader processes),
    from the same config."""
    root = str(tmp_path_factory.mktemp("cuda") / "run")
    cfg = tiny_config(root)
    shard.run(cfg)
    cpu = teacher_cache.run(tiny_config(root, **{"cache.resources.use_gpu": False, "cache.root": f"{root}/cache-cpu"}))
    gpu = teacher_cache.run(tiny_config(root, **{"cache.resources.use_gpu": True, "cache.resources.readers": 2, "cache.root": f"{root}/cache-gpu"}))
    return root, cpu, gpu


def test_targets_on_the_gpu_agree_with_the_cpu_within_bf16(gpu_run):
    _, cpu, gpu = gpu_run
    assert cpu.spec == gpu.spec  # the device is not part of what a target is
    a = torch.from_numpy(cpu.read(slice(0, 12), 0))
    b = torch.from_numpy(gpu.read(slice(0, 12), 0))
    assert a.abs().sum() > 0 and b.abs().sum() > 0
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    relative = (a - b).norm(dim=-1) / a.norm(dim=-1)
    assert cosine.min() > 0.99, float(cosine.min())  # bf16 keeps 8 bits of mantissa: ~0.4% per value
    assert relative.mean() < 0.03, float(relative.mean())
    boxes_cpu, boxes_gpu = zarr.open_group(cpu.zarr_url, mode="r")["boxes"][:], zarr.open_group(gpu.zarr_url, mode="r")["boxes"][:]
    assert np.array_equal(boxes_cpu, boxes_gpu)  # same crops, computed by the readers


def test_a_distill_step_on_the_gpu_lowers_the_loss(gpu_run):
    root, _, store = gpu_run
    cfg = tiny_config(root)
    device = torch.device("cuda")
    teacher = load_teacher(cfg.teacher, device=device)
    student = build_student(teacher, cfg.teacher, StudentConfig(registers=4))
    unlock(student, cfg.student.unlock_patterns)
    model = PatchFeatures(student, None).to(device)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-3)
    manifest = Manifest.load(cfg.shards_url)
    pre = Preprocess.from_dict(store.spec.teacher["preprocess"])
    pixels, targets = next(in_order(StepBatches(CachedPairs(manifest, pre, store=store), 0, 0, 1, 8, 1), 1))
    images = pre.normalize(pixels.pin_memory().to(device, non_blocking=True))
    targets = targets.pin_memory().to(device, non_blocking=True).float()
    losses = []
    for _ in range(20):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            pred = model(images)
        loss, _, _ = distill_loss(pred, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0], losses


def test_pinned_non_blocking_copies_keep_every_batch(gpu_run):
    """Batches from reader processes, pinned and copied without waiting, arrive on the GPU
    equal to what the readers made, also while the next copies are queued."""
    root, _, store = gpu_run
    manifest = Manifest.load(tiny_config(root).shards_url)
    pre = Preprocess.from_dict(store.spec.teacher["preprocess"])
    plan = StepBatches(CachedPairs(manifest, pre, store=store, hflip=0.5), 0, 0, 1, 2, 3)
    expected = list(in_order(plan, len(plan), 0))
    on_gpu = []
    for pixels, targets in in_order(plan, len(plan), readers=2):
        on_gpu.append((pixels.pin_memory().to("cuda", non_blocking=True), targets.pin_memory().to("cuda", non_blocking=True)))
    torch.cuda.synchronize()
    assert len(on_gpu) == len(expected)
    for (p, t), (pe, te) in zip(on_gpu, expected):
        assert torch.equal(p.cpu(), pe) and torch.equal(t.cpu(), te)


def test_teacher_targets_on_the_gpu_match_each_image_alone(gpu_run):
    """Batched GPU targets of a unit equal each (image, variant) computed alone on the GPU,
    within bf16 batch-order noise."""
    root, _, store = gpu_run
    cfg = tiny_config(root)
    manifest = Manifest.load(cfg.shards_url)
    computer = TeacherTargets(cfg.teacher, store, manifest, device="cuda")
    jobs = view_jobs(manifest.units()[:1], store.spec.variants, 1)
    views = UnitViews(manifest, store.spec, computer.preprocess, jobs)
    stored = torch.from_numpy(store.read(slice(0, len(jobs)), 0))
    for i in range(len(jobs)):
        ((row, _, pixels, _, offsets, flips, _),) = views(i)
        alone = computer.targets(pixels[None], offsets[None], flips[None])[0].cpu()
        assert torch.nn.functional.cosine_similarity(alone, stored[row], dim=-1).min() > 0.99


def test_distill_and_export_on_the_gpu(gpu_run):
    root, _, store = gpu_run
    cfg = tiny_config(root, **{"distill.resources.use_gpu": True, "distill.resources.readers": 2, "distill.store": store.url,
                               "student.name": "gpu"})
    (result,) = distill.run(cfg)
    assert result.metrics["step"] == 12
    (folder,) = export.run(cfg)
    assert os.path.exists(os.path.join(folder, "model.safetensors"))
    x = torch.randn(1, 3, 64, 64)
    features = load_exported_features(folder)(x)
    assert features.shape[-1] == describe_teacher(cfg.teacher).dim and torch.isfinite(features).all()
