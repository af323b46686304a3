"""An exclusive, expiring writer lease on a folder (local or object storage).

Two teacher-cache runs on the same store would not corrupt it (targets are deterministic and
every object is written whole), but they would waste a cluster's time and leave readers
seeing objects being rewritten. The second run is therefore refused, naming the first.

The holder rewrites `lease.json` every `ttl / 4` seconds. A lease is stale when its
heartbeat is older than `ttl`, or at once when its holder ran on this host and that process
is gone (a killed driver is resumed without waiting). Acquiring writes the lease, waits a
moment and reads it back: of two runs racing, only the one whose lease survived proceeds.
"""
from __future__ import annotations

import os
import socket
import threading
import time
import uuid

from pipeline.errors import PipelineError
from pipeline.storage import exists, join_url, read_json, url_to_fs, write_json


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    def __init__(self, folder: str, storage_options=None, ttl: float = 60.0, what: str = "writer"):
        self.url = join_url(folder, "lease.json")
        self.storage_options, self.ttl, self.what = storage_options, ttl, what
        self.me = {"id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def holder(self) -> dict | None:
        """The current live holder, or None when there is none or it is stale."""
        if not exists(self.url, self.storage_options):
            return None
        try:
            lease = read_json(self.url, self.storage_options)
        except (FileNotFoundError, ValueError):
            return None
        if time.time() - lease.get("heartbeat", 0) > self.ttl:
            return None
        if lease.get("host") == self.me["host"] and not _alive(lease.get("pid", -1)):
            return None
        return lease

    def acquire(self, settle: float = 0.5) -> None:
        holder = self.holder()
        if holder and holder["id"] != self.me["id"]:
            raise PipelineError(self._refusal(holder))
        self._write()
        time.sleep(settle)
        holder = read_json(self.url, self.storage_options)
        if holder["id"] != self.me["id"]:
            raise PipelineError(self._refusal(holder))
        self._thread = threading.Thread(target=self._beat, daemon=True, name="lease")
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        try:
            if read_json(self.url, self.storage_options)["id"] == self.me["id"]:
                fs, path = url_to_fs(self.url, self.storage_options)
                fs.rm(path)
        except FileNotFoundError:
            pass

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    def _write(self) -> None:
        write_json(self.url, {**self.me, "heartbeat": time.time()}, self.storage_options)

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            self._write()

    def _refusal(self, holder: dict) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
        return (f"another {self.what} holds {self.url}: process {holder.get('pid')} on {holder.get('host')}, running "
                f"since {since}. Wait for it to finish; if it died on another host its lease expires "
                f"{self.ttl:.0f} s after its last heartbeat.")
