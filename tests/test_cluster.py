"""The stages on a real two-node Ray cluster, submitted the way a user does it: `make <stage>`
with RAY_ADDRESS set submits a Ray job to the cluster's dashboard; all data lives on
the S3 endpoint (moto's server on loopback).

The cluster is two `ray start` processes on this machine (a head with the dashboard and a
second node joining it), each with one CPU and a custom resource (`node_a`, `node_b`), so
two one-CPU actors or Ray Train workers can only run one per node. Each node has its own
ports and its own temp dir (kept in pytest's afterwards, so the nodes' logs outlive a
failure). Teardown kills exactly the processes of these two nodes (their sessions, plus the
job drivers, which run in sessions of their own under a node's job supervisor); never
`ray stop`, which would kill every Ray on the machine.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import yaml

from tests.conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parent.parent  # its `ray` CLI submits; its `python` runs the jobs
# Leave the venv alone: `make -o` treats it as up to date whatever pyproject.toml's date.
MAKE = ["make", "--no-print-directory", "-C", str(REPO), f"VENV={VENV}", "-o", f"{VENV}/.installed"]


@dataclass
class Cluster:
    address: str  # the dashboard URL, what RAY_ADDRESS holds for job submission
    nodes: dict[str, str]  # custom resource name -> Ray node id


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """Run in a session of its own, so a timeout kills the command and all it started."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} timed out after {timeout} s:\n{out[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out)


def ray_start(args: list, env: dict, sessions: list[int]) -> None:
    """`ray start` in a new session: the node's daemons keep that session id after it exits."""
    proc = subprocess.Popen([str(VENV / "bin" / "ray"), "start", *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    sessions.append(proc.pid)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out


def kill_sessions(sessions: list[int]) -> None:
    """SIGTERM, then SIGKILL after 3 s: a graceful GCS/raylet shutdown takes 10-15 s and
    buys nothing for a throwaway cluster."""
    procs = set()
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getsid(p.pid) in sessions:
                procs |= {p, *p.children(recursive=True)}
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=3)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=10)


def alive_nodes(address: str) -> dict[str, str]:
    from ray.util.state import list_nodes

    with contextlib.suppress(Exception):  # the dashboard may still be starting
        return {name: n.node_id for n in list_nodes(address=address, filters=[("state", "=", "ALIVE")])
                for name in n.resources_total if name.startswith("node_")}
    return {}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # Ray's unix sockets live in <temp>/<node>/session_<time>_<pid>/sockets/ (107 bytes at most),
    # too long under pytest's folders (one per xdist worker): the nodes run in a short folder of
    # /tmp, moved into pytest's afterwards so that their logs outlive a failure.
    temp = Path(tempfile.mkdtemp(prefix="phc-", dir="/tmp"))
    # The nodes' processes (and so every worker and job driver) get this environment: the S3
    # test credentials set by conftest, and the venv's `python` for the jobs' entrypoints.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PATH=f"{VENV / 'bin'}:{env['PATH']}", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    gcs, dashboard = free_port(), free_port()
    common = ["--num-cpus", 1, "--num-gpus", 0, "--object-store-memory", 200 * 2**20, "--disable-usage-stats",
              "--dashboard-agent-listen-port"]  # its default (52365) is taken by any other Ray here
    sessions: list[int] = []
    try:
        ray_start(["--head", "--port", gcs, "--temp-dir", temp / "a", "--resources", '{"node_a": 1}',
                   "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", dashboard,
                   "--ray-client-server-port", free_port(), *common, free_port()], env, sessions)
        ray_start(["--address", f"127.0.0.1:{gcs}", "--temp-dir", temp / "b", "--resources", '{"node_b": 1}',
                   *common, free_port()], env, sessions)
        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.monotonic() + 60
        while len(nodes := alive_nodes(address)) < 2:
            assert time.monotonic() < deadline, f"the cluster did not come up: {nodes}"
            time.sleep(1)
        yield Cluster(address, nodes)
    finally:
        kill_sessions(sessions)
        shutil.move(temp, tmp_path_factory.mktemp("ray"))


def submit(cluster: Cluster, stage: str, *make_args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`make <stage>` with RAY_ADDRESS set, as a user would type it."""
    return run([*MAKE, stage, *make_args], {**os.environ, "RAY_ADDRESS": cluster.address}, timeout)


def test_without_ray_address_stages_run_locally():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    local = run([*MAKE, "-n", "shard", "CONFIG=a.yaml b.yaml"], env, 30)
    assert local.stdout.strip() == f"{VENV}/bin/python -m stages shard --config a.yaml --config b.yaml"
    tests = run([*MAKE, "-n", "test"], {**env, "RAY_ADDRESS": "http://head:8265"}, 30)
    assert tests.stdout.startswith("env -u RAY_ADDRESS "), tests.stdout  # tests always start a local Ray


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_stages_run_as_jobs_on_both_nodes(cluster, s3_bucket, tmp_path):
    import s3fs

    url, options = s3_bucket
    # One CPU per node and one per actor / worker: the two must land on different nodes.
    cfg = tiny_config(url, options, **{"cache.num_actors": 2, "cache.resources.cpus": 1,
                                       "distill.num_workers": 2, "distill.resources.cpus": 1})
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))

    # Each stage's own summary line shows that the job's logs streamed back.
    stages = {"shard": "shard: 12 images in 3 shards", "teacher-cache": "on 2 actor(s)", "distill": "distill: s3://"}
    for stage, says in stages.items():
        done = submit(cluster, stage, f"CONFIG={config}")
        assert done.returncode == 0, done.stdout[-6000:]
        assert says in done.stdout and "succeeded" in done.stdout, done.stdout[-6000:]

    fs = s3fs.S3FileSystem(**options)
    root = url.removeprefix("s3://")
    markers = [json.loads(fs.cat_file(p)) for p in fs.glob(f"{root}/cache/*/complete/*.json")]
    assert len(markers) == 3  # 12 images in shards of 4
    assert {m.get("node") for m in markers} == set(cluster.nodes.values()), markers

    events = [json.loads(line) for line in fs.cat_file(f"{root}/students/{cfg.student.name}/events.jsonl").splitlines()]
    assert events[0]["event"] == "start" and events[0]["workers"] == 2, events
    assert sorted(events[0].get("nodes", [])) == sorted(cluster.nodes.values()), events  # one rank on each node


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_failed_job_fails_make(cluster):
    # configs/demo.yaml is a relative path: it resolves inside the job's uploaded working dir.
    done = submit(cluster, "list", "ARGS=--cache.num_actors 'not a number'", timeout=120)
    assert done.returncode != 0, done.stdout[-4000:]
    # The driver's message came back (the quoted value arrived as one argument), and the job is reported failed.
    assert "phreg list: error:" in done.stdout and "'not a number'" in done.stdout, done.stdout[-4000:]
    assert "failed" in done.stdout, done.stdout[-4000:]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_stopped_job_fails_make(cluster):
    """A job stopped from outside (`ray job stop`) must not look like success to make."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    proc = subprocess.Popen([*MAKE, "demo"], env={**os.environ, "RAY_ADDRESS": cluster.address}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        client, running, deadline = JobSubmissionClient(cluster.address), [], time.time() + 120
        while not running and time.time() < deadline:
            running = [j for j in client.list_jobs() if j.status == JobStatus.RUNNING and " demo" in j.entrypoint]
            time.sleep(0.5)
        assert running, "the demo job never started"
        client.stop_job(running[0].submission_id)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0, out[-4000:]
    assert f"job {running[0].submission_id} stopped" in out, out[-4000:]
