"""Runs that fit the cluster they are given: worker counts decided from the cluster's GPUs and
CPUs, and a request it cannot place refused before any compute instead of waiting forever."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.placement import Node, default_readers, plan_workers

CPU_ONLY = [Node(cpus=2)]
ONE_GPU = [Node(cpus=16, gpus=1, name="gpu-a")]
TWO_NODES = [Node(cpus=16, gpus=4, name="a"), Node(cpus=8, gpus=4, name="b")]


@pytest.mark.parametrize("nodes, use_gpu, expected", [
    (CPU_ONLY, False, 1), (ONE_GPU, True, 1), (TWO_NODES, True, 8), (ONE_GPU, False, 1),
])
def test_auto_is_one_worker_per_gpu_or_one_on_cpus(nodes, use_gpu, expected):
    assert plan_workers("distill.num_workers", "auto", use_gpu, 1.0, nodes) == expected


def test_explicit_requests_that_fit_are_kept():
    assert plan_workers("distill.num_workers", 2, False, 1.0, CPU_ONLY) == 2
    assert plan_workers("distill.num_workers", 8, True, 2.0, TWO_NODES) == 8
    # CPUs per worker are counted per node: 3 CPUs each fit 5 + 2 workers on 16 + 8 CPUs
    assert plan_workers("cache.num_actors", 7, False, 3.0, TWO_NODES) == 7


def test_more_gpus_than_the_cluster_has_are_refused_naming_both():
    with pytest.raises(ConfigError) as info:
        plan_workers("distill.num_workers", 2, True, 1.0, ONE_GPU)
    message = str(info.value)
    assert "distill.num_workers=2" in message and "1 CPU(s) and 1 GPU each" in message
    assert "only 1 fit" in message and "1 GPU(s)" in message and "16 CPUs" in message


def test_cpus_per_worker_above_the_largest_node_are_refused():
    with pytest.raises(ConfigError, match=r"no node can hold one.*at most 16 on one node"):
        plan_workers("distill.num_workers", 1, False, 17.0, TWO_NODES)
    with pytest.raises(ConfigError, match="only 7 fit"):  # 5 + 2 workers of 3 CPUs
        plan_workers("cache.num_actors", 8, False, 3.0, TWO_NODES)


def test_gpus_asked_of_a_cluster_without_any_are_refused_unless_it_autoscales():
    with pytest.raises(ConfigError, match="auto with GPUs.*0 GPU"):
        plan_workers("distill.num_workers", "auto", True, 1.0, CPU_ONLY)
    assert plan_workers("distill.num_workers", "auto", True, 1.0, CPU_ONLY, autoscaling=True) == 1
    assert plan_workers("distill.num_workers", 4, True, 1.0, CPU_ONLY, autoscaling=True) == 4


def test_readers_follow_the_workers_cpus_on_a_gpu():
    assert default_readers(None, True, 1.0) == 2  # never fewer than two feeding a GPU
    assert default_readers(None, True, 8.0) == 7  # one core left to the training loop
    assert default_readers(None, False, 8.0) == 0  # on the CPU the model's threads use the cores
    assert default_readers(3, True, 8.0) == 3


@pytest.mark.parametrize("nodes, workers, use_gpu", [
    ([Node(cpus=2)], 1, False), ([Node(cpus=16, gpus=1)], 1, True), ([Node(cpus=16, gpus=2)], 2, True),
])
def test_the_demo_config_fits_machines_with_zero_one_or_several_gpus(nodes, workers, use_gpu):
    from stages.distill import placed

    cfg = placed(load_config(["configs/demo.yaml"]), nodes)
    assert (cfg.distill.num_workers, cfg.distill.resources.use_gpu) == (workers, use_gpu)


@pytest.mark.slow
def test_the_cli_refuses_workers_a_gpu_cluster_cannot_place(tmp_path):
    """The real CLI against a real local Ray that declares one GPU (this machine has none):
    two GPU workers are refused before any compute (no store, no run folder is read or
    written), with a message naming what was asked and what the cluster has; auto plans one."""
    script = textwrap.dedent(f"""
        import ray, sys
        ray.init(num_cpus=2, num_gpus=1, include_dashboard=False)
        from stages.cli import main
        from stages.distill import placed
        from stages.runtime import cluster_nodes
        from pipeline.config import load_config
        cfg = placed(load_config(["configs/demo.yaml"]), cluster_nodes())
        print("auto:", cfg.distill.num_workers, cfg.distill.resources.use_gpu, flush=True)
        main(["distill", "--config", "configs/demo.yaml", "--storage.run_root", {str(tmp_path / 'run')!r},
              "--distill.num_workers", "2"])
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert "auto: 1 True" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "phreg distill: error: distill.num_workers=2 asks for 2 workers of 1 CPU(s) and 1 GPU each, but only 1 fit" \
        in proc.stderr and "1 GPU(s)" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "run").exists()


def test_both_stages_reserve_by_one_resources_shape_and_older_flat_keys_still_load():
    from pipeline.config import CacheConfig, DistillConfig, Resources

    cache, distill = CacheConfig(), DistillConfig()
    assert isinstance(cache.resources, Resources) and isinstance(distill.resources, Resources)
    assert set(type(cache.resources).model_fields) == set(type(distill.resources).model_fields)
    assert (cache.resources.prefetch, distill.resources.prefetch) == (2, 4)  # each stage keeps its read-ahead
    assert DistillConfig(resources={"cpus": 2}).resources.prefetch == 4
    with pytest.warns(FutureWarning, match=r"cache\.cpus_per_actor is now cache\.resources\.cpus"):
        moved = CacheConfig(cpus_per_actor=3, readers=2, resources={"threads": 1})
    assert (moved.resources.cpus, moved.resources.readers, moved.resources.threads) == (3.0, 2, 1)
    with pytest.warns(FutureWarning, match=r"distill\.threads_per_worker is now distill\.resources\.threads"):
        moved = DistillConfig(cpus_per_worker=2, threads_per_worker=1, use_gpu=False)
    assert (moved.resources.cpus, moved.resources.threads, moved.resources.use_gpu) == (2.0, 1, False)
