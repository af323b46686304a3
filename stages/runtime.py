"""Ray at the edge: connect to a cluster (RAY_ADDRESS) or start a local one."""
from __future__ import annotations

import logging
import os
import sys

import ray
from tqdm import tqdm

from pipeline.placement import Node

LOCAL_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
# For every worker, here or on a cluster: Ray Train's print patch would echo each line twice.
WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def init_ray() -> None:
    """Same code path everywhere: with RAY_ADDRESS set the stages run on that cluster,
    otherwise Ray starts on this machine with all its CPUs."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or None
    if address is None:
        for key, value in LOCAL_ENV.items():
            os.environ.setdefault(key, value)
    # Workers' and Ray's own log lines stay in Ray's log folder: the console shows the stage's
    # progress and summary. Worker errors still arrive, as the exceptions they raised.
    debug = debugging()
    context = ray.init(address=address, logging_level=logging.INFO if debug else logging.ERROR, log_to_driver=debug,
                       runtime_env={"env_vars": WORKER_ENV})
    if not debug:
        logging.getLogger("ray").setLevel(logging.ERROR)
        session = context.address_info.get("session_dir")
        say(f"ray: logs in {os.path.join(session, 'logs') if session else 'the cluster session folder'} "
            f"(PHREG_DEBUG=1 shows them here)")


def debugging() -> bool:
    """PHREG_DEBUG=1: every log line on the console and full tracebacks."""
    return bool(os.environ.get("PHREG_DEBUG"))


def cluster_gpus() -> float:
    return ray.cluster_resources().get("GPU", 0.0)


def cluster_nodes() -> list[Node]:
    """The alive nodes of the connected cluster with the CPUs and GPUs each declares."""
    return [Node(cpus=n["Resources"].get("CPU", 0.0), gpus=n["Resources"].get("GPU", 0.0), name=n["NodeManagerAddress"])
            for n in ray.nodes() if n.get("Alive")]


def progress(total: int, desc: str, unit: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr, mininterval=1.0)


def say(message: str) -> None:
    print(message, flush=True)
