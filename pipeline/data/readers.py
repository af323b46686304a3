"""Prepare batches ahead of their consumer, in order, in reader processes or in a thread.

`in_order(load, n, readers, depth)` yields `collate(load(0)), collate(load(1)), ...`: each
`load(i)` returns the samples of batch i (tuples of tensors, arrays or numbers), which are
stacked field by field. With `readers` > 0, torch DataLoader worker processes run the loads:
reader k of n prepares batches k, k + n, ... and the DataLoader hands them back in index
order, so the consumer sees the same batches whatever the number of readers. A reader stacks
its batch straight into shared memory (torch's `default_collate` does so in a worker), so a
batch crosses the process boundary without another copy. Processes, not threads: decoding
JPEGs and resizing crops hold the GIL for part of their time, and the consumer's interpreter
is busy driving the model.

Readers are forked, and `load` is copied into each one by a pickle round trip first: the
objects it holds then reopen their files, Zarr stores and object-storage clients in the
reader (an async filesystem client opened before a fork does not work after it).

With `readers` = 0 one background thread of the consumer runs the loads instead.
"""
from __future__ import annotations

import pickle
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info
from torch.utils.data._utils.collate import default_collate

from pipeline.data.prefetch import prefetch


class _Batches(Dataset):
    def __init__(self, load: Callable, n: int):
        self.load, self.n = load, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return default_collate(self.load(i))


def _reopen(worker_id: int) -> None:
    dataset = get_worker_info().dataset
    dataset.load = pickle.loads(pickle.dumps(dataset.load))


def in_order(load: Callable[[int], list], n: int, readers: int = 0, depth: int = 2) -> Iterator:
    """The stacked samples of `load(i)` for i in range(n), in order, each reader `depth`
    batches ahead. Closing the iterator (or dropping it) stops the readers."""
    if readers == 0:
        return prefetch((default_collate(load(i)) for i in range(n)), depth)
    loader = DataLoader(_Batches(load, n), batch_size=None, num_workers=readers, prefetch_factor=depth,
                        worker_init_fn=_reopen, multiprocessing_context="fork", collate_fn=_as_is,
                        # its own generator: seeding the readers leaves the global RNG alone
                        generator=torch.Generator())
    return _iterate(loader)


def _as_is(batch):
    return batch


def _iterate(loader: DataLoader) -> Iterator:
    it = iter(loader)
    try:
        yield from it
    finally:
        del it  # the last reference: its readers stop now, not when the garbage collector runs
