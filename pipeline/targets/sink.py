"""Where a teacher actor's targets go: from the device into the store, without stalling the model.

For every batch, the targets are encoded to the store's type on the device that computed them
(float16, bfloat16 bits, or int8 with per-token scales), checked for NaN/Inf there, and copied
without blocking into a host buffer laid out as the unit's Zarr shard (pinned memory on a GPU,
so the copy is asynchronous). When a unit's last batch is in, a CUDA event marks the end of
its copies and a writer thread waits on that event, never the model's loop, before writing the
buffer as it is (`TargetStore.write_encoded`) and marking the unit complete. A few buffers
rotate and two writers write units side by side: the model fills one buffer while others are
written, and only waits when every buffer is still being written, which bounds the memory. An actor keeps its sink (and its pinned buffers,
slow to allocate) across tasks.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from pipeline.data.manifest import Unit
from pipeline.errors import PipelineError
from pipeline.targets.store import TargetStore, encode_tensor, host_array

ENCODED = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.int16, "int8": torch.int8}


def node_id() -> str | None:
    """The Ray node this runs on (recorded with each unit), None outside Ray."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


# Largest magnitude each stored type holds: a larger float32 target would be stored as inf.
LIMITS = {"float16": torch.finfo(torch.float16).max}


def finite(x: torch.Tensor, limit: float | None = None) -> torch.Tensor:
    """Whether every value of `x` is finite (and within +-limit), as a tensor on x's device
    (no synchronisation). Its extremes suffice: both propagate NaN, and an infinity is one of
    them; one reduction costs a tenth of `isfinite(x).all()`, which writes a mask as large as x."""
    low, high = torch.aminmax(x)
    ok = torch.isfinite(low) & torch.isfinite(high)
    return ok if limit is None else ok & (low >= -limit) & (high <= limit)


@dataclass
class Buffer:
    """One unit's stored arrays on the host, each (unit_rows * V, ...) in shard order."""

    parts: dict[str, torch.Tensor]
    finite: torch.Tensor  # on the device: every target of the unit so far is finite
    finite_host: torch.Tensor
    rows: int = 0  # rows of the unit held now (the rest are zero)
    rejected: dict[int, tuple[str, str]] = field(default_factory=dict)  # global index -> (key, reason)
    event: torch.cuda.Event | None = None
    writing: Future | None = None
    started: float = 0.0
    compute: float = 0.0


@dataclass
class UnitSink:
    store: TargetStore
    device: torch.device
    buffers: int = 3
    writers: int = 2  # units written side by side: a write is mostly copying into the page cache
    results: list[dict] = field(default_factory=list)

    def __post_init__(self):
        spec = self.store.spec
        self.variants, pinned = spec.variants, self.device.type == "cuda"
        (gh, gw), D, slots = spec.grid, spec.dim, spec.unit_rows * spec.variants

        def host(shape, dtype):
            return torch.zeros(shape, dtype=dtype, pin_memory=pinned)

        def buffer() -> Buffer:
            parts = {"targets": host((slots, gh, gw, D), ENCODED[spec.dtype]), "boxes": host((slots, 4), torch.float32)}
            if spec.dtype == "int8":
                parts["scales"] = host((slots, gh, gw), torch.float32)
            if self.store.has_crops:
                parts["crops"] = host((slots, 3, *spec.teacher["img_size"]), torch.uint8)
            return Buffer(parts, torch.ones((), dtype=torch.bool, device=self.device), host((), torch.bool))

        self.pool = [buffer() for _ in range(self.buffers)]
        self.writer = ThreadPoolExecutor(max_workers=self.writers, thread_name_prefix="unit-writer")
        self.turn = 0
        self.current: Buffer | None = None

    def begin(self, unit: Unit) -> None:
        """Take the next buffer for `unit` (waiting while it is still being written)."""
        buf = self.pool[self.turn % len(self.pool)]
        self.turn += 1
        if buf.writing is not None:
            writing, buf.writing = buf.writing, None
            self.results.append(writing.result())  # raises what the writer raised
        if unit.count < buf.rows:  # a shorter unit: rows past its images must be zero
            for t in buf.parts.values():
                t[unit.count * self.variants:buf.rows * self.variants].zero_()
        buf.rows, buf.started, buf.compute, buf.rejected = unit.count, time.time(), 0.0, {}
        buf.finite.fill_(True)
        self.current = buf

    def add(self, first: int, targets: torch.Tensor, boxes: torch.Tensor, pixels: torch.Tensor | None,
            seconds: float = 0.0) -> None:
        """Targets (n, gh, gw, D) on the device of the unit's (row, variant) pairs first,
        first + 1, ... (flat index row * V + variant), their boxes (n, 4) and uint8 crops."""
        buf, n, dtype = self.current, len(targets), self.store.spec.dtype
        buf.finite &= finite(targets, LIMITS.get(dtype))
        span = slice(first, first + n)
        if targets.is_cuda or dtype == "int8":  # encoded on the device: only stored bytes cross
            stored, scales = encode_tensor(targets, dtype)
            buf.parts["targets"][span].copy_(stored, non_blocking=True)
            if scales is not None:
                buf.parts["scales"][span].copy_(scales, non_blocking=True)
        else:  # on the host the copy into the buffer is the conversion: one pass over the targets
            stored = buf.parts["targets"].view(torch.bfloat16) if dtype == "bfloat16" else buf.parts["targets"]
            stored[span].copy_(targets)
        buf.parts["boxes"][span].copy_(boxes)
        if "crops" in buf.parts:
            buf.parts["crops"][span].copy_(pixels)
        buf.compute += seconds

    def reject(self, index: int, key: str, reason: str) -> None:
        """Image `index` of the current unit could not be read: its rows hold zeros (never the
        blank views' targets) and the marker lists it, so that readers of the store skip it."""
        self.current.rejected[index] = (key, reason)

    def end(self, unit: Unit) -> None:
        """The unit's last batch is in: write it once its copies have landed."""
        buf = self.current
        buf.finite_host.copy_(buf.finite, non_blocking=True)
        if self.device.type == "cuda":
            buf.event = torch.cuda.Event()
            buf.event.record()
        buf.writing = self.writer.submit(self._write, unit, buf)
        self.current = None

    def drain(self) -> list[dict]:
        """Wait for every write; the statistics of the units written since the last drain, in
        order. The buffers stay for the next units (pinned memory is slow to allocate)."""
        pending = sorted((b for b in self.pool if b.writing is not None), key=lambda b: b.started)
        writes = [b.writing for b in pending]
        for buf in pending:
            buf.writing = None
        results, self.results = self.results, []
        for writing in writes:  # every write waited for, the first failure raised
            results.append(writing.exception() or writing.result())
        if failed := [r for r in results if isinstance(r, BaseException)]:
            raise failed[0]
        return results

    def _write(self, unit: Unit, buf: Buffer) -> dict:
        if buf.event is not None:
            buf.event.synchronize()
        if not bool(buf.finite_host):
            raise PipelineError(f"unit {unit.id} (shard {unit.shard}, rows {unit.start}-{unit.start + unit.count - 1}): "
                                f"the teacher produced NaN or Inf features")
        rows, V = self.store.spec.unit_rows, self.variants
        parts = {name: host_array(t).reshape(rows, V, *t.shape[1:]) for name, t in buf.parts.items()}
        for index in buf.rejected:
            for part in parts.values():
                part[index - unit.start] = 0
        tw = time.perf_counter()
        written = self.store.write_encoded(unit, parts)
        stats = {"images": unit.count, "variants": V, "compute_seconds": round(buf.compute, 3),
                 "write_seconds": round(time.perf_counter() - tw, 3), "node": node_id(), **written}
        if buf.rejected:
            stats["rejected"] = [{"index": i, "key": k, "reason": r} for i, (k, r) in sorted(buf.rejected.items())]
        self.store.mark_complete(unit.id, stats)
        return {"unit": unit.id, "started": buf.started, "finished": time.time(), **stats}
