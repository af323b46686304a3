"""How many workers (or actors) a stage runs, and whether the cluster can place them.

Pure functions over a list of nodes (`Node`: the CPUs and GPUs Ray reports for each alive
node), so the arithmetic is tested on hand-made clusters; `stages.runtime.cluster_nodes()`
reads the real one. A request the cluster cannot place would otherwise wait forever (Ray
Train waits for a placement group, an actor pool for actors that never start): it is refused
before any compute, naming what was asked and what the cluster has.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.errors import ConfigError


@dataclass(frozen=True)
class Node:
    cpus: float
    gpus: float = 0.0
    name: str = "node"


def cluster_gpus(nodes: list[Node]) -> int:
    return int(sum(n.gpus for n in nodes))


def fits_on(node: Node, cpus: float, use_gpu: bool) -> int:
    """Workers of `cpus` CPUs (and one GPU each with `use_gpu`) that fit on one node."""
    by_cpu = int(node.cpus // cpus + 1e-9)
    return min(by_cpu, int(node.gpus)) if use_gpu else by_cpu


def describe(nodes: list[Node]) -> str:
    cpus, gpus = sum(n.cpus for n in nodes), cluster_gpus(nodes)
    largest = max((n.cpus for n in nodes), default=0)
    return (f"the cluster has {len(nodes)} node(s), {cpus:g} CPUs (at most {largest:g} on one node) "
            f"and {gpus} GPU(s)")


def plan_workers(what: str, requested: int | Literal["auto"], use_gpu: bool, cpus: float, nodes: list[Node],
                 cpu_default: int = 1, autoscaling: bool = False) -> int:
    """The number of workers for `what` (e.g. "distill.num_workers"): `auto` is one per GPU
    when `use_gpu`, else `cpu_default`; an explicit number is checked against `nodes`. With
    `autoscaling` the cluster may add nodes for a request, so only its shape is checked."""
    if requested == "auto":
        if use_gpu:
            if not cluster_gpus(nodes) and not autoscaling:
                raise ConfigError(f"{what}: auto with GPUs, but {describe(nodes)}; set use_gpu: false to run on CPUs")
            requested = max(1, cluster_gpus(nodes))
        else:
            requested = cpu_default
    if autoscaling:
        return requested
    each = f"{cpus:g} CPU(s){' and 1 GPU' if use_gpu else ''} each"
    if not any(fits_on(n, cpus, use_gpu) for n in nodes):
        raise ConfigError(f"{what}={requested} asks for workers of {each}, but no node can hold one: {describe(nodes)}. "
                          f"Lower the CPUs per worker, or add a larger node "
                          f"(cluster.autoscaling: true if the cluster adds nodes on demand).")
    room = sum(fits_on(n, cpus, use_gpu) for n in nodes)
    if requested > room:
        raise ConfigError(f"{what}={requested} asks for {requested} workers of {each}, but only {room} fit: "
                          f"{describe(nodes)}. Use {what}: auto, or at most {room} "
                          f"(cluster.autoscaling: true if the cluster adds nodes on demand).")
    return requested


def default_readers(configured: int | None, on_gpu: bool, cpus: float) -> int:
    """`cache.resources.readers` / `distill.resources.readers`, else, feeding a GPU, the worker's CPUs minus one
    for the loop that drives the model (never fewer than 2); none on the CPU, where the model's
    own threads already use the worker's cores."""
    if configured is not None:
        return configured
    return max(2, int(cpus) - 1) if on_gpu else 0
