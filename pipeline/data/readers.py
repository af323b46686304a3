"""Prepare batches ahead of their consumer, in order, in reader processes or in a thread.

`in_order(load, n, readers, depth)` yields the batches `stack(load(0)), stack(load(1)), ...`:
each `load(i)` returns the samples of batch i (tuples of tensors, arrays or numbers), which
are stacked field by field into tensors. With `readers` > 0, torch DataLoader worker
processes run the loads: reader k of n prepares batches k, k + n, ... and the DataLoader hands
them back in index order, so the consumer sees the same batches whatever the number of
readers. Processes, not threads: decoding JPEGs and resizing crops hold the GIL for part of
their time, and the consumer's interpreter is busy driving the model.

Moving a batch between processes is what costs: fresh shared memory for every batch (what a
DataLoader worker allocates by default) costs a reader more in page faults and system calls
than a third of its decoding (BENCHMARKS.md, "Data path"). So each reader stacks its batches
into a few shared-memory slots of its own, made once and reused; a thread of the consumer copies
a batch out of its slot (into page-locked memory with `pin_memory`, ready for an asynchronous copy to
a GPU) and hands the slot back at once, so the batches it receives are its own to keep. A
slot's memory crosses the process boundary once; after that only its index does.

Readers are forked, and `load` is copied into each one by a pickle round trip first: the
objects it holds then reopen their files, Zarr stores and object-storage clients in the
reader (an async filesystem client opened before a fork does not work after it).

With `readers` = 0 one background thread of the consumer runs the loads instead.
"""
from __future__ import annotations

import pickle
import time
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from pipeline.data.prefetch import prefetch


def stack(samples: list[tuple], out: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
    """Samples (tuples of tensors, arrays or numbers) -> one tensor per field, written into
    `out`'s tensors where their shapes and types match. Samples that are named tuples give a
    batch of their type, so batches are read by name (`batch.targets`)."""
    fields = []
    for i, values in enumerate(zip(*samples)):
        values = [v if torch.is_tensor(v) else torch.as_tensor(np.asarray(v)) for v in values]
        shape, dtype = (len(values), *values[0].shape), values[0].dtype
        target = out[i] if out is not None and i < len(out) else None
        if target is None or tuple(target.shape) != shape or target.dtype != dtype:
            target = torch.empty(shape, dtype=dtype)
        fields.append(torch.stack(values, out=target))
    return like(samples[0], fields)


def like(example: tuple, fields) -> tuple:
    """`fields` as a tuple of `example`'s type (a named tuple stays one)."""
    return type(example)._make(fields) if hasattr(example, "_fields") else tuple(fields)


class _Slots(Dataset):
    """Batch i = `load(i)` stacked into one of this reader's shared-memory slots, taken when
    the consumer has handed it back (`free`, shared with the consumer)."""

    def __init__(self, load: Callable, n: int, free: torch.Tensor, per_reader: int):
        self.load, self.n, self.free, self.per_reader = load, n, free, per_reader
        self.slots: list[list[torch.Tensor]] = [[] for _ in range(per_reader)]
        self.turn = 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        mine = self.turn % self.per_reader
        self.turn += 1
        index = get_worker_info().id * self.per_reader + mine
        while not self.free[index]:
            time.sleep(0.0005)
        self.free[index] = 0
        batch = stack(self.load(i), self.slots[mine])
        made = [t for t in batch if not t.is_shared()]
        for t in made:  # a field of a new shape: moved to shared memory once, then reused
            t.share_memory_()
        self.slots[mine][:] = batch
        # the consumer already holds the slot's tensors unless one was just made: only the
        # index crosses the pipe then (passing a tensor's shared memory costs a round trip)
        return index, (batch if made else None)


def _reopen(worker_id: int) -> None:
    dataset = get_worker_info().dataset
    dataset.load = pickle.loads(pickle.dumps(dataset.load))


def in_order(load: Callable[[int], list], n: int, readers: int = 0, depth: int = 2,
             pin_memory: bool = False) -> Iterator[tuple[torch.Tensor, ...]]:
    """The stacked samples of `load(i)` for i in range(n), in order, each reader `depth`
    batches ahead, in page-locked memory with `pin_memory`. Closing the iterator (or dropping
    it) stops the readers."""
    if readers == 0:
        batches = (stack(load(i)) for i in range(n))
        return prefetch((_pinned(b) for b in batches) if pin_memory else batches, depth)
    per_reader = depth + 2  # its batches in flight, and a spare
    free = torch.ones(readers * per_reader, dtype=torch.int32).share_memory_()
    loader = DataLoader(_Slots(load, n, free, per_reader), batch_size=None, num_workers=readers, prefetch_factor=depth,
                        worker_init_fn=_reopen, multiprocessing_context="fork", collate_fn=_as_is,
                        # its own generator: seeding the readers leaves the global RNG alone
                        generator=torch.Generator())
    # copied out of the slots by a thread (memcpy releases the GIL): a GPU step's loop then
    # finds its next batch ready instead of spending ~5 ms per 23 MB batch copying it
    return prefetch(_copied(loader, free, pin_memory), depth)


def _copy(t: torch.Tensor, pin_memory: bool) -> torch.Tensor:
    """A copy by one memcpy in this thread: torch's copy_ of a large tensor fans out to its
    intra-op threads, which wait on each other while the readers hold the cores."""
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin_memory)
    np.copyto(_bytes(out), _bytes(t))
    return out


def _bytes(t: torch.Tensor) -> np.ndarray:
    return t.reshape(-1).view(torch.uint8).numpy()


def _as_is(batch):
    return batch


def _pinned(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return like(batch, [t.pin_memory() for t in batch])


def _copied(loader: DataLoader, free: torch.Tensor, pin_memory: bool) -> Iterator[tuple[torch.Tensor, ...]]:
    it = iter(loader)
    seen = {}  # the slots' tensors stay referenced here, so each stays mapped in this process
    try:
        for index, batch in it:
            if batch is not None:
                seen[index] = batch
            batch = seen[index]
            mine = like(batch, [_copy(t, pin_memory) for t in batch])
            free[index] = 1
            yield mine
    finally:
        free.fill_(1)  # no reader may stay waiting for a slot
        del it  # the last reference: its readers stop now, not when the garbage collector runs
