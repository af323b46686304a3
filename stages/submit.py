"""Run one stage as a Ray job on the cluster at RAY_ADDRESS (what `make <stage>` does then).

    python -m stages.submit teacher-cache --config configs/demo.yaml

The repository is uploaded as the job's working dir (cluster/runtime_env.yaml), the driver's
output streams back, and the exit status is the job's: 0 only when it SUCCEEDED. (`ray job
submit` exits 0 for a job that was stopped, which would let `make teacher-cache && make
distill` go on after someone stopped the first job.) Ctrl-C stops following, not the job.
"""
from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time

import yaml

RUNTIME_ENV = os.path.join("cluster", "runtime_env.yaml")


def main(argv: list[str]) -> int:
    from ray.job_submission import JobStatus, JobSubmissionClient

    address = os.environ.get("RAY_ADDRESS")
    if not address or not argv:
        print("usage: RAY_ADDRESS=http://<head>:8265 python -m stages.submit <stage> [options]", file=sys.stderr)
        return 2
    with open(RUNTIME_ENV) as f:
        runtime_env = yaml.safe_load(f)
    client = JobSubmissionClient(address)
    submission_id = f"phreg-{argv[0]}-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(3).hex()}"
    client.submit_job(entrypoint=shlex.join(["python", "-m", "stages", *argv]), runtime_env=runtime_env,
                      submission_id=submission_id)
    print(f"job {submission_id} submitted to {address}; following its output", flush=True)

    async def follow():
        async for lines in client.tail_job_logs(submission_id):
            print(lines, end="", flush=True)

    try:
        asyncio.run(follow())
    except KeyboardInterrupt:
        print(f"\nstopped following; the job keeps running. Stop it with: ray job stop {submission_id}", file=sys.stderr)
        return 130
    info = client.get_job_info(submission_id)
    while info.status not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:  # logs can end first
        time.sleep(0.5)
        info = client.get_job_info(submission_id)
    message = f": {info.message}" if info.message and info.status != JobStatus.SUCCEEDED else ""
    print(f"job {submission_id} {info.status.value.lower()}{message}", flush=True)
    return 0 if info.status == JobStatus.SUCCEEDED else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
