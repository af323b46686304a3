"""Distillation at scale: online mode, joint flips, many students, other architectures, faults."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import psutil
import pytest
import timm
import torch
import yaml

from pipeline.data.images import Preprocess
from pipeline.data.manifest import Manifest
from pipeline.errors import ConfigError, PipelineError
from pipeline.models.export import load_exported_features, max_output_difference
from pipeline.models.vit import PatchFeatures, describe_teacher
from pipeline.storage import join_url
from pipeline.targets.store import store_spec
from pipeline.targets.views import prepare
from pipeline.training import checkpoint
from pipeline.training.pairs import CachedPairs, OnlineViews
from stages import distill, export, teacher_cache
from tests.conftest import copy_run, tiny_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cached(tmp_path_factory, tiny_run):
    """A corpus and its target store, shared by the tests of this module (which add students
    and stores to it: a copy of the session's)."""
    return copy_run(tiny_run, tmp_path_factory.mktemp("distill") / "run")


def _events(cfg, name=None):
    path = join_url(cfg.students_url, name or cfg.student.name, "events.jsonl")
    return [json.loads(line) for line in open(path)]


def test_online_views_are_new_every_epoch_and_match_cached_variants(cached):
    cfg = tiny_config(cached)
    manifest = Manifest.load(cfg.shards_url)
    spec = replace(store_spec(cfg.tta, cfg.cache, describe_teacher(cfg.teacher), manifest), crop="random")
    views = OnlineViews(manifest, Preprocess.from_dict(spec.teacher["preprocess"]), spec=spec)
    plan = [(0, np.array([1]))]
    e0, e1 = next(views.examples(plan, 0)), next(views.examples(plan, 1))
    assert not torch.equal(e0[0], e1[0]) or not np.array_equal(e0[1], e1[1])
    # epoch e draws exactly what a cache's variant e holds for that image
    from pipeline.data.images import decode_rgb
    from pipeline.data.shards import read_images

    item = prepare(decode_rgb(read_images(manifest, [1])[0]), 1, 1, spec, views.preprocess, 0)
    assert torch.equal(item.pixels, e1[0]) and np.array_equal(item.offsets, e1[1]) and np.array_equal(item.flips, e1[2])


def test_joint_flip_mirrors_image_and_target(cached):
    cfg = tiny_config(cached)
    manifest = Manifest.load(cfg.shards_url)
    store = teacher_cache.run(cfg)
    pre = Preprocess.from_dict(store.spec.teacher["preprocess"])
    plan = [(0, np.arange(4))]
    plain = list(CachedPairs(manifest, pre, store=store).examples(plan, 0))
    flipped = list(CachedPairs(manifest, pre, store=store, hflip=1.0).examples(plan, 0))
    for (x, t), (xf, tf) in zip(plain, flipped):
        assert torch.equal(xf, x.flip(-1)) and torch.equal(tf, t.flip(1))


def test_online_mode_trains_without_a_store(cached, tmp_path):
    no_cache = os.path.join(cached, "no-cache")
    cfg = tiny_config(cached, **{"distill.targets": "online", "cache.root": no_cache, "student.name": "online",
                                 "distill.epochs": 1})
    (result,) = distill.run(cfg)
    assert result.metrics["step"] == 6
    assert not os.path.exists(no_cache)
    state = json.load(open(os.path.join(result.checkpoint.path, "state.json")))
    assert state["targets"] == "online" and state["store"] is None


def test_many_students_from_one_cache(cached):
    cfg = tiny_config(cached, **{"distill.epochs": 1, "students": [
        {"student": {"name": "many-r2", "registers": 2}},
        {"student": {"name": "many-r6", "registers": 6, "unlock": ["reg_token", "pos_embed"]}, "distill": {"lr": 3e-4}},
    ]})
    results = distill.run(cfg)
    assert [r.metrics["step"] for r in results] == [6, 6]
    exports = export.run(cfg)
    assert [os.path.basename(e) for e in exports] == ["many-r2", "many-r6"]
    for url, registers in zip(exports, (2, 6)):
        assert timm.create_model(f"local-dir:{url}", pretrained=True).reg_token.shape[1] == registers
    # the unlocked set was honoured: r6 kept its last block frozen
    r6, _, _ = checkpoint.load_student(checkpoint.latest(join_url(cfg.students_url, "many-r6")))
    teacher = timm.create_model("local-dir:" + exports[0], pretrained=True)
    assert torch.equal(r6.blocks[-1].mlp.fc1.weight, _teacher(cfg).blocks[-1].mlp.fc1.weight)
    assert not torch.equal(teacher.blocks[-1].mlp.fc1.weight, _teacher(cfg).blocks[-1].mlp.fc1.weight)


def test_kept_epochs_are_exported_by_choice(cached):
    """keep_every_epochs keeps epochs 2 and 4 beside the single latest checkpoint (keep_last 1);
    export.epoch exports a kept epoch, and a missing one is refused with the list of kept epochs."""
    cfg = tiny_config(cached, **{"student.name": "kept", "distill.epochs": 4, "distill.keep_every_epochs": 2,
                                 "distill.keep_last": 1, "distill.checkpoint_every": 4})
    distill.run(cfg)
    run_url = join_url(cfg.students_url, "kept")
    assert checkpoint.kept_epochs(run_url) == [2, 4]
    # 6 checkpoints were written; Ray Train deletes all but the latest (the one before may still be on its way out)
    assert 1 <= len([n for n in os.listdir(run_url) if n.startswith("checkpoint_")]) <= 2
    epoch2, _, state2 = checkpoint.load_student(checkpoint.of_epoch(run_url, 2))
    last, _, last_state = checkpoint.load_student(checkpoint.latest(run_url))
    assert (state2["step"], last_state["step"]) == (12, 24)
    assert not torch.equal(epoch2.pos_embed, last.pos_embed)

    chosen = cfg.model_copy(update={"export": cfg.export.model_copy(update={"epoch": 2})})
    (url,) = export.run(chosen)
    assert url.endswith("exports/kept-epoch2")
    assert torch.equal(timm.create_model(f"local-dir:{url}", pretrained=True).pos_embed, epoch2.pos_embed)
    missing = cfg.model_copy(update={"export": cfg.export.model_copy(update={"epoch": 3})})
    with pytest.raises(PipelineError, match=r"no student kept for epoch 3 .* kept epochs are \[2, 4\]"):
        export.run(missing)


def _teacher(cfg):
    from pipeline.models.vit import load_teacher

    return load_teacher(cfg.teacher)


def test_student_of_another_width_with_projection(cached):
    narrow = {"student.model": "vit_tiny_patch16_224", "student.model_kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2},
              "student.name": "narrow", "distill.epochs": 1}
    cfg = tiny_config(cached, **narrow)
    (result,) = distill.run(cfg)
    assert os.path.exists(os.path.join(result.checkpoint.path, "projection.safetensors"))
    (url,) = export.run(cfg)
    assert os.path.exists(os.path.join(url, "projection.safetensors"))
    trained, projection, _ = checkpoint.load_student(result.checkpoint.path)
    assert projection.weight.shape == (48, 32)
    exported = load_exported_features(url)
    assert max_output_difference(PatchFeatures(trained, projection), exported) == 0.0
    assert exported(torch.randn(1, 3, 64, 64)).shape == (1, 4, 4, 48)

    wrong = tiny_config(cached, **{**narrow, "student.name": "wrong-grid",
                                   "student.model_kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2, "patch_size": 8}})
    with pytest.raises(ConfigError, match="8x8 patch grid .* teacher's targets are 4x4"):
        distill.run(wrong)
    assert not os.path.exists(join_url(wrong.students_url, "wrong-grid"))


def _slow(cached, name, **extra):
    """A student that trains for a while (12 blocks at 224 px) so it can be killed part-way:
    4 epochs of 6 steps, seconds of training after its first checkpoint."""
    return tiny_config(cached, **{"student.name": name, "teacher.img_size": 224, "teacher.model_kwargs": {},
                                  "cache.root": os.path.join(cached, "cache-224"), "distill.epochs": 4,
                                  "distill.checkpoint_every": 6, "distill.log_every": 3, **extra})


def _past_first_checkpoint(cfg) -> bool:
    """Ray Train's controller has registered a checkpoint. A checkpoint folder on storage, or
    a step logged after it, is not enough: the controller registers reports when it next
    polls the workers, and a worker killed before that restarts from the previous one."""
    try:
        snapshot = json.loads(open(join_url(cfg.students_url, cfg.student.name, "checkpoint_manager_snapshot.json")).read())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return snapshot.get("latest_checkpoint_result") is not None


def test_killed_worker_restores_from_checkpoint(cached):
    cfg = _slow(cached, "worker-kill", **{"distill.max_failures": 2})
    teacher_cache.run(cfg)
    killed = []

    def killer():
        deadline = time.time() + 300
        while not _past_first_checkpoint(cfg) and time.time() < deadline:
            time.sleep(0.1)
        workers = [p for p in psutil.Process().children(recursive=True) if "RayTrainWorker" in " ".join(p.cmdline())]
        if workers:
            workers[0].kill()
            killed.append(workers[0].pid)

    thread = threading.Thread(target=killer)
    thread.start()
    (result,) = distill.run(cfg)
    thread.join()
    assert killed, "no training worker was found to kill"
    assert result.metrics["step"] == 24
    events = _events(cfg)
    assert events[0]["event"] == "start" and any(e["event"] == "resume" and e["step"] > 0 for e in events[1:])


def test_rerun_after_the_whole_job_died_resumes(cached, tmp_path):
    """Checkpoints every 4 steps of 6-step epochs, so the job resumes inside an epoch; the
    resumed student must equal one trained without interruption, bit for bit (same seed and
    data order: any sample skipped or trained twice after the resume changes the weights)."""
    cfg = _slow(cached, "driver-kill", **{"distill.checkpoint_every": 4})
    teacher_cache.run(cfg)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    command = [sys.executable, "-m", "stages", "distill", "--config", str(path)]
    env = {**os.environ, "RAY_ADDRESS": ""}
    # The uninterrupted run trains in this process's Ray while the job below is killed in Ray of
    # its own (the two share nothing but the store they read); the rerun is this process's.
    with ThreadPoolExecutor(1) as pool:
        uninterrupted_run = pool.submit(distill.run, cfg.model_copy(
            update={"student": cfg.student.model_copy(update={"name": "uninterrupted"})}))
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                                env=env)
        deadline = time.time() + 300
        while not _past_first_checkpoint(cfg):
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.time() < deadline
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        distill.run(cfg)  # the same command again
        events = _events(cfg)
        assert [e["event"] for e in events][:1] == ["start"] and events[-1]["event"] == "resume"
        assert events[-1]["step"] >= 4 and events[-1]["step"] % 6 != 0  # resumed inside an epoch
        resumed, _, state = checkpoint.load_student(checkpoint.latest(join_url(cfg.students_url, "driver-kill")))
        assert state["step"] == 24

        (result,) = uninterrupted_run.result()
    uninterrupted, _, _ = checkpoint.load_student(checkpoint.latest(join_url(cfg.students_url, "uninterrupted")))
    for (name, a), b in zip(resumed.state_dict().items(), uninterrupted.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs from the uninterrupted run's"
