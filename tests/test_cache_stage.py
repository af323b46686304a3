"""Teacher-cache stage: verify, list, variants, storage types, and surviving kill -9."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import torch
import yaml
import zarr

from pipeline.data.images import Preprocess
from pipeline.data.manifest import Manifest
from pipeline.errors import PipelineError
from pipeline.training.pairs import CachedPairs
from stages import caches, shard, teacher_cache
from stages.cli import main
from tests.conftest import copy_run, tiny_config


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_run):
    """This module's copy of the tiny corpus, with the store of tiny_config complete in its
    default cache root (only read here: the tests write into cache roots of their own)."""
    return copy_run(tiny_run, tmp_path_factory.mktemp("corpus") / "run")


def _cache(corpus: str, tmp_path) -> str:
    """A cache root of this test's own inside the shared corpus's run root."""
    return os.path.join(corpus, "caches", tmp_path.name)


def _with_tiny_store(corpus: str, root: str) -> str:
    """Cache root `root` holding a copy of the complete store of tiny_config: what
    teacher_cache.run(tiny_config(corpus, cache.root=root)) would compute there."""
    shutil.copytree(os.path.join(corpus, "cache"), root, dirs_exist_ok=True)
    return root


def test_verify_passes_and_names_each_problem(corpus, tmp_path):
    cfg = tiny_config(corpus, **{"cache.root": _with_tiny_store(corpus, _cache(corpus, tmp_path))})
    store = teacher_cache.run(cfg)
    assert caches.verify(cfg) == []

    # one unit's rows silently changed after they were written
    targets = zarr.open_group(store.zarr_url, mode="r+")["targets"]
    row = Manifest.load(cfg.shards_url).units()[1].start
    targets[row] = np.full(targets.shape[1:], np.nan, dtype=targets.dtype)
    os.remove(store.marker_url(2))
    with pytest.raises(PipelineError) as info:
        caches.verify(cfg)
    message = str(info.value)
    assert "unit 1 (shard 1, rows 4-7): stored data differ" in message
    assert f"NaN or Inf in rows [{row}]" in message
    assert "1 of 3 units have no completion marker (first: [2])" in message

    # a rerun recomputes exactly what is missing, but not the tampered unit: verify keeps failing
    teacher_cache.run(cfg)
    with pytest.raises(PipelineError, match="unit 1 "):
        caches.verify(cfg)


def test_cli_verify_exits_non_zero(corpus, tmp_path, capsys):
    """`phreg verify`'s exit status: 0 for a good store, 2 naming the problem otherwise (the
    CLI's own main in this process, on this session's Ray: what `python -m stages` runs)."""
    cfg = tiny_config(corpus, **{"cache.root": _with_tiny_store(corpus, _cache(corpus, tmp_path))})
    teacher_cache.run(cfg)
    args = ["verify", "--storage.run_root", corpus, "--cache.root", _cache(corpus, tmp_path), *_flags(cfg)]
    main(args)  # returns: exit status 0
    assert "is complete and consistent" in capsys.readouterr().out
    store_url = os.path.join(_cache(corpus, tmp_path), os.listdir(_cache(corpus, tmp_path))[0])
    os.remove(os.path.join(store_url, "complete", "00000000.json"))
    with pytest.raises(SystemExit) as bad:
        main(args)
    assert bad.value.code == 2 and "no completion marker" in capsys.readouterr().err


def test_list_shows_side_by_side_stores(corpus, tmp_path):
    root = _with_tiny_store(corpus, _cache(corpus, tmp_path))
    a = tiny_config(corpus, **{"cache.root": root})
    b = tiny_config(corpus, **{"cache.root": root, "tta.counts": 2, "cache.dtype": "int8"})
    teacher_cache.run(a)
    teacher_cache.run(b)
    rows = {r["counts"]: r for r in caches.list_caches(a)}
    assert set(rows) == {4, 2} and rows[2]["dtype"] == "int8"
    assert all(r["units_done"] == r["units_total"] == 3 for r in rows.values())


def test_storage_types_are_faithful(corpus, tmp_path):
    stores = {}
    root = _with_tiny_store(corpus, _cache(corpus, tmp_path))  # its float16 store
    for dtype in ("float32", "float16", "bfloat16", "int8"):
        cfg = tiny_config(corpus, **{"cache.root": root, "cache.dtype": dtype})
        stores[dtype] = teacher_cache.run(cfg)
    reference = stores["float32"].read(slice(0, 12), 0)
    for dtype, store in stores.items():
        values = store.read(slice(0, 12), 0)
        cos = torch.nn.functional.cosine_similarity(torch.from_numpy(values), torch.from_numpy(reference), dim=-1)
        assert cos.min() > 0.999, dtype
    assert stores["int8"].group["targets"].dtype == np.int8


def test_variants_have_their_own_crops_and_views(corpus, tmp_path):
    cfg = tiny_config(corpus, **{"cache.root": _cache(corpus, tmp_path), "cache.variants": 2})
    assert cfg.cache.crop_mode == "random"
    store = teacher_cache.run(cfg)
    boxes = store.group["boxes"][0:4]
    assert boxes.shape == (4, 2, 4) and not np.array_equal(boxes[:, 0], boxes[:, 1])
    manifest = Manifest.load(cfg.shards_url)
    reader = CachedPairs(manifest, Preprocess.from_dict(store.spec.teacher["preprocess"]), store=store)
    image0, target0 = next(reader.examples([(0, np.array([0]))], epoch=0))
    image1, target1 = next(reader.examples([(0, np.array([0]))], epoch=1))  # epoch 1 -> variant 1
    assert not torch.equal(image0, image1)  # the student sees the crop of the variant ...
    assert np.array_equal(target1.float().numpy(), store.read(slice(0, 1), 1)[0])  # ... with that variant's target


def test_stored_crops_are_the_pixels_the_teacher_saw(corpus, tmp_path):
    """cache.store_crops (the default) keeps each row's uint8 crop: students read, bit for bit,
    what a store without crops makes them decode; both kinds have one fingerprint, and list,
    verify and the digest in each marker cover the crops."""
    root = _cache(corpus, tmp_path)
    with_crops = teacher_cache.run(tiny_config(corpus, **{"cache.root": _with_tiny_store(corpus, f"{root}/a")}))
    plain = teacher_cache.run(tiny_config(corpus, **{"cache.root": f"{root}/b", "cache.store_crops": False}))
    assert with_crops.has_crops and not plain.has_crops
    assert with_crops.spec.fingerprint == plain.spec.fingerprint
    assert with_crops.group["crops"].shape == (12, 1, 3, 64, 64) and "crops" not in plain.group
    marker = with_crops.marker(0)
    assert marker["crop_bytes"] == 4 * 3 * 64 * 64 and "crop_bytes" not in plain.marker(0)

    manifest = Manifest.load(tiny_config(corpus).shards_url)
    pre = Preprocess.from_dict(with_crops.spec.teacher["preprocess"])
    plan = [(u.id, np.arange(u.count)[::-1]) for u in manifest.units()]
    a = list(CachedPairs(manifest, pre, store=with_crops).examples(plan, 0))
    b = list(CachedPairs(manifest, pre, store=plain).examples(plan, 0))
    assert len(a) == len(b) == 12
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))

    kinds = {r["crops"] for r in caches.list_caches(tiny_config(corpus, **{"cache.root": f"{root}/a"}))}
    assert kinds == {True}
    cfg = tiny_config(corpus, **{"cache.root": f"{root}/a"})
    assert caches.verify(cfg) == []
    crops = zarr.open_group(with_crops.zarr_url, mode="r+")["crops"]
    crops[5, 0, 0, 0, 0] = crops[5, 0, 0, 0, 0] ^ 1  # one bit of one pixel
    with pytest.raises(PipelineError, match="unit 1 .*stored data differ"):
        caches.verify(cfg)


def test_xarray_reads_the_store(corpus):
    xr = pytest.importorskip("xarray")
    store = teacher_cache.run(tiny_config(corpus))  # only read: the module's store
    ds = xr.open_zarr(store.zarr_url, zarr_format=3, consolidated=False)
    assert ds["targets"].dims == ("row", "variant", "y", "x", "channel")
    assert ds["targets"].shape == (12, 1, 4, 4, 48)
    assert ds["crops"].dims == ("row", "variant", "rgb", "pixel_y", "pixel_x") and ds["crops"].shape == (12, 1, 3, 64, 64)


def _flags(cfg) -> list[str]:
    """The tiny teacher's settings as CLI flags (the command must find the same store)."""
    return ["--teacher.model", cfg.teacher.model, "--teacher.img_size", str(cfg.teacher.img_size),
            "--teacher.model_kwargs", yaml.safe_dump(cfg.teacher.model_kwargs, default_flow_style=True).strip(),
            "--tta.counts", str(cfg.tta.counts), "--shard.sample_size", str(cfg.shard.sample_size),
            "--shard.shard_size", str(cfg.shard.shard_size)]


def _run_cli(config_path, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "stages", "teacher-cache", "--config", str(config_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, env=env)


def _markers(store_root) -> int:
    folders = [os.path.join(store_root, d, "complete") for d in os.listdir(store_root)] if os.path.isdir(store_root) else []
    return sum(len(os.listdir(f)) for f in folders if os.path.isdir(f))


def _busy_actors(proc) -> list[psutil.Process]:
    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
        return [p for p in tree if "CacheActor.compute" in " ".join(p.cmdline())]
    except psutil.Error:
        return []


def _wait_for(predicate, proc, timeout=240):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def _files(root: str) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file under `root`."""
    return {os.path.join(d, n): (os.stat(os.path.join(d, n)).st_size, os.stat(os.path.join(d, n)).st_mtime_ns)
            for d, _, names in os.walk(root) for n in names}


RAY_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


def is_ray_agent(title: str) -> bool:
    return title.startswith(RAY_AGENTS) or "dashboard/agent.py" in title or "runtime_env/agent/main.py" in title


def _gone_or_agent(p: psutil.Process) -> bool:
    try:
        return is_ray_agent(" ".join(p.cmdline()))
    except psutil.NoSuchProcess:
        return True


def _wait_for_all_but_agents(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Waits until every process of `procs` has exited, Ray's node agents aside, or `timeout`
    has passed; returns those still alive. (Agents may never exit: waiting for them too would
    always take the whole timeout.)"""
    deadline = time.time() + timeout
    _, alive = psutil.wait_procs(procs, timeout=0)
    while alive and time.time() < deadline and not all(_gone_or_agent(p) for p in alive):
        _, alive = psutil.wait_procs(alive, timeout=0.2)
    return alive


def test_ray_agents_are_recognised_by_their_full_title():
    assert is_ray_agent("ray::DashboardAgent") and is_ray_agent("ray::RuntimeEnvAgent --foo")
    assert not is_ray_agent("ray::CacheActor.compute") and not is_ray_agent("ray::raylet")
    # a live process titled like the agent: its command line carries the whole title
    agent = subprocess.Popen(["bash", "-c", "exec -a ray::DashboardAgent sleep 30"])
    try:
        time.sleep(0.3)
        assert is_ray_agent(" ".join(psutil.Process(agent.pid).cmdline()))
    finally:
        agent.kill()
        agent.wait()


def test_kill_minus_nine_of_driver_and_worker_resumes_to_an_identical_store(tmp_path, ray_local):
    # A heavier teacher (12 blocks at 224 px) so that the run is killed part-way.
    settings = {"shard.sample_size": 16, "shard.shard_size": 2, "teacher.img_size": 224,
                "teacher.model_kwargs": {}, "tta.counts": 6, "cache.batch_images": 1}
    run = str(tmp_path / "run")
    reference = tiny_config(run, **settings, **{"cache.root": str(tmp_path / "reference")})
    shard.run(reference)
    ref_store = teacher_cache.run(reference)
    units = len(Manifest.load(reference.shards_url).units())

    killed_root = str(tmp_path / "killed")
    cfg = tiny_config(run, **settings, **{"cache.root": killed_root, "cache.num_actors": 2})
    config_path = tmp_path / "killed.yaml"
    config_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {**os.environ, "RAY_ADDRESS": ""}

    # 1. kill -9 the driver's PID alone after the first unit is complete: the local Ray it started
    # (GCS, raylet, the teacher actors) must die with it, and nothing may go on writing the store
    proc = _run_cli(config_path, env)
    _wait_for(lambda: _markers(killed_root) >= 1, proc)
    tree = psutil.Process(proc.pid).children(recursive=True)
    assert any("CacheActor" in " ".join(p.cmdline()) for p in tree if p.is_running())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # Ray's per-node agents (dashboard, runtime env) can linger after their raylet died; they
    # hold no data and write nothing. Everything else (GCS, raylet, workers, actors) must be gone
    # within a minute.
    alive = _wait_for_all_but_agents(tree, timeout=60)
    orphans = []
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            # the full title: Linux truncates p.name() to 15 characters ("ray::DashboardA")
            title = " ".join(p.cmdline())
            p.kill()
            if not is_ray_agent(title):
                orphans.append((p.pid, title))
    assert not orphans, f"processes outlived the killed driver: {orphans}"
    written = _files(killed_root)
    time.sleep(3)
    assert _files(killed_root) == written, "the store changed after the driver and its Ray were gone"
    partial = _markers(killed_root)
    assert 1 <= partial < units
    marker_dir = os.path.join(killed_root, os.path.basename(ref_store.url), "complete")
    finished = {n: (os.stat(os.path.join(marker_dir, n)).st_mtime_ns, open(os.path.join(marker_dir, n)).read())
                for n in os.listdir(marker_dir)}

    # 2. resume; kill -9 a teacher actor while it computes: Ray restarts it and retries its unit
    proc = _run_cli(config_path, env)
    _wait_for(lambda: bool(_busy_actors(proc)), proc)
    _busy_actors(proc)[0].kill()
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out.decode()[-3000:]
    # exactly the units without a marker were recomputed: the finished ones' markers are untouched
    assert f"{units - partial} to compute ({partial} already complete)" in out.decode()
    for name, (mtime, text) in finished.items():
        path = os.path.join(marker_dir, name)
        assert os.stat(path).st_mtime_ns == mtime and open(path).read() == text, name

    # the resumed store equals the uninterrupted one, and verifies
    killed = zarr.open_group(os.path.join(killed_root, os.path.basename(ref_store.url), "targets.zarr"), mode="r")
    reference_group = zarr.open_group(ref_store.zarr_url, mode="r")
    for name in ("targets", "boxes"):
        assert np.array_equal(killed[name][:], reference_group[name][:]), name
    assert _markers(killed_root) == units
    assert caches.verify(cfg) == []
