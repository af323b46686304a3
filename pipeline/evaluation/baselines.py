"""Baselines the evaluate stage measures beside the teacher and the student: what a user would
pick instead of distilling. Each becomes a `ModelRef` that Ray tasks load like any other
model, so every metric and picture of the report covers it.

- test-time registers (`pipeline.models.register_neurons`): the register neurons are
  located once, in one Ray task (`locate_job`), on a handful of images; the baseline is then
  the teacher with those neurons moved to an extra token.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.data.images import Preprocess, crop_box, decode_rgb
from pipeline.data.manifest import Manifest
from pipeline.data.shards import read_images
from pipeline.errors import ConfigError
from pipeline.evaluation.plan import evaluation_indices
from pipeline.evaluation.tasks import ModelRef
from pipeline.models.register_neurons import locate

TEST_TIME_REGISTERS = "test-time-registers"


@dataclass
class LocateJob:
    manifest: Manifest
    indices: list[int]
    preprocess: Preprocess
    model: ModelRef
    detect_block: int
    threshold: float | None
    max_block: int | None
    top_k: int | str
    max_top_k: int
    storage_options: dict


def locate_request(base: ModelRef, manifest: Manifest, preprocess: Preprocess, ttr, storage_options) -> LocateJob:
    """The job that locates `base`'s register neurons on `ttr.images` images of `manifest`
    (`ttr`: the evaluate.ttr section)."""
    if base.teacher is None:
        raise ConfigError("evaluate.baselines are built from a timm model (the teacher, or evaluate.model given as a "
                          "timm name), not from an export folder")
    return LocateJob(manifest, evaluation_indices(manifest, ttr.images), preprocess, base, ttr.detect_block,
                     ttr.threshold, ttr.max_block, ttr.top_k, ttr.max_top_k, storage_options)


def locate_job(job: LocateJob) -> dict:
    """The register neurons of the job's model, located on its images (centre crops)."""
    images = [decode_rgb(data) for data in read_images(job.manifest, job.indices, job.storage_options)]
    x = torch.stack([job.preprocess(img, crop_box(img.width, img.height, job.preprocess.size, "center")) for img in images])
    model = job.model.load(job.storage_options).model
    x = x.to(next(model.parameters()).device)
    location = locate(model, x, job.detect_block, job.threshold, job.max_block, job.top_k, job.model.name,
                      job.max_top_k)
    return {**location.to_dict(), "located_on": {"shards": job.manifest.url, "indices": job.indices}}


def registers_baseline(base: ModelRef, location: dict) -> ModelRef:
    """The baseline: `base` (a timm model built from a teacher config) with the located neurons moved."""
    neurons = tuple((n["layer"], n["index"]) for n in location["neurons"])
    return ModelRef(TEST_TIME_REGISTERS, teacher=base.teacher, test_time_registers=neurons)


def describe_baseline(base: ModelRef, location: dict, shards_url: str) -> str:
    """What the report says the baseline is."""
    neurons = ", ".join(f"{n['layer']}.{n['index']}" for n in location["neurons"])
    return (f"test-time registers on `{base.name}` (Jiang et al. 2025): one extra token takes the activations of "
            f"{len(location['neurons'])} register neurons (block.neuron: {neurons}), located on {location['images']} "
            f"images of `{shards_url}`")
