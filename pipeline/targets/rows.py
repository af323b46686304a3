"""Whole rows of an uncompressed, sharded Zarr v3 array, read and written straight from memory.

A distill reader's work per sample is reading one target row and one crop row: megabytes
that sit in a Zarr shard as one contiguous run of raw bytes. Zarr's own read of one chunk
costs about twice the time of the bytes alone here (its async machinery, and copies through
its buffers: BENCHMARKS.md, "Data path"), so for the layout this store writes (uncompressed
chunks of one (row, variant), sharded along rows) a row is one positioned read of its byte
range, found in the shard's index, into the caller's array. Anything else goes through Zarr.
Writing is the mirror image: a unit's rows, already laid out in memory as the shard's chunks
are (C order of (row, variant)), are the shard object; `write_shard` writes them as they are
and appends the index (Zarr's own encoder copies every chunk on its way and was the slowest
part of the teacher-cache stage: BENCHMARKS.md, "Teacher-cache sink").

The format is Zarr v3's sharding codec: a shard object holds its chunks and, at its end, an
index of (offset, nbytes) uint64 pairs per chunk in C order, followed by a CRC32C of the index;
a chunk never written has both set to 2**64 - 1 and reads as the fill value.
"""
from __future__ import annotations

import os
import uuid
from collections import OrderedDict

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec

from pipeline.storage import has_scheme, join_url, url_to_fs

MISSING = np.uint64(2**64 - 1)


def direct_readable(array: zarr.Array) -> bool:
    """Whether `array` has the layout `RowReader` reads: chunks of one (row, variant) holding
    the rest of the array, sharded along rows only, raw little-endian bytes, index at the end."""
    codecs = array.metadata.codecs
    if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
        return False
    sharding = codecs[0]
    inner_raw = len(sharding.codecs) == 1 and isinstance(sharding.codecs[0], BytesCodec)
    index_plain = [type(c) for c in sharding.index_codecs] in ([BytesCodec, Crc32cCodec], [BytesCodec])
    little = inner_raw and (sharding.codecs[0].endian is None or sharding.codecs[0].endian.value == "little")
    native = np.little_endian and (array.dtype.itemsize == 1 or little)
    chunk, shard = sharding.chunk_shape, array.shards
    return (inner_raw and index_plain and native and sharding.index_location.value == "end"
            and tuple(chunk[:2]) == (1, 1) and tuple(chunk[2:]) == tuple(array.shape[2:])
            and tuple(shard[1:]) == tuple(array.shape[1:]))


class RowReader:
    """Reads (row, variant) rows of one array laid out as `direct_readable` says. Cheap to
    make; opens files and reads each shard's index on first use (a process's own)."""

    def __init__(self, array: zarr.Array, array_url: str, storage_options=None, open_files: int = 64):
        self.url, self.storage_options = array_url, storage_options or {}
        self.rows_per_shard, self.variants = array.shards[0], array.shape[1]
        self.row_shape, self.dtype = tuple(array.shape[2:]), array.dtype
        self.ndim, self.fill = array.ndim, array.fill_value
        sharding = array.metadata.codecs[0]
        self.index_bytes = 16 * self.rows_per_shard * self.variants + 4 * any(
            isinstance(c, Crc32cCodec) for c in sharding.index_codecs)
        self.key = array.metadata.chunk_key_encoding.encode_chunk_key
        self.local = not has_scheme(array_url)
        self.fs = None if self.local else url_to_fs(array_url, storage_options)[0]
        self.indexes: dict[int, np.ndarray] = {}
        self.files: OrderedDict[int, int] = OrderedDict()  # shard -> file descriptor (local stores)
        self.open_files = open_files

    def _path(self, shard: int) -> str:
        url = join_url(self.url, self.key((shard,) + (0,) * (self.ndim - 1)))
        return url if self.local else url_to_fs(url, self.storage_options)[1]

    def _fd(self, shard: int) -> int:
        if shard in self.files:
            self.files.move_to_end(shard)
            return self.files[shard]
        if len(self.files) >= self.open_files:
            os.close(self.files.popitem(last=False)[1])
        self.files[shard] = os.open(self._path(shard), os.O_RDONLY)
        return self.files[shard]

    def _read(self, shard: int, offset: int, out: memoryview) -> None:
        if self.local:
            fd, done = self._fd(shard), 0
            while done < len(out):
                n = os.preadv(fd, [out[done:]], offset + done)
                if n == 0:
                    raise OSError(f"{self._path(shard)}: ends before byte {offset + len(out)}")
                done += n
        else:
            data = self._cat(shard, offset, offset + len(out))
            if len(data) != len(out):
                raise OSError(f"{self._path(shard)}: {len(data)} bytes at {offset}, expected {len(out)}")
            out[:] = data

    def _cat(self, shard: int, start: int, end: int | None) -> bytes:
        try:
            return self.fs.cat_file(self._path(shard), start=start, end=end)
        except FileNotFoundError:  # s3fs's own message does not say which object
            raise FileNotFoundError(f"no such object: {self.url}/{self.key((shard,) + (0,) * (self.ndim - 1))}") from None

    def _index(self, shard: int) -> np.ndarray:
        """(rows_per_shard * variants, 2) offsets and sizes. A missing shard is an error, not
        fill values: readers read only rows of units marked complete, whose shards exist."""
        if shard not in self.indexes:
            if self.local:
                size = os.fstat(self._fd(shard)).st_size
                raw = bytearray(self.index_bytes)
                self._read(shard, size - self.index_bytes, memoryview(raw))
            else:
                raw = self._cat(shard, -self.index_bytes, None)
            entries = self.rows_per_shard * self.variants
            self.indexes[shard] = np.frombuffer(bytes(raw[:16 * entries]), dtype="<u8").reshape(entries, 2)
        return self.indexes[shard]

    def read_into(self, row: int, variant: int, out: np.ndarray) -> None:
        """Row `row`, variant `variant` into `out` (shape `row_shape`, C-contiguous)."""
        shard, within = divmod(row, self.rows_per_shard)
        offset, nbytes = self._index(shard)[within * self.variants + variant]
        if offset == MISSING:  # a chunk Zarr left out of the shard (all fill value)
            out[...] = self.fill
            return
        if nbytes != out.nbytes:
            raise OSError(f"{self._path(shard)}: chunk of row {row} holds {nbytes} bytes, expected {out.nbytes}")
        self._read(shard, int(offset), memoryview(out.reshape(-1).view(np.uint8)))

    def close(self) -> None:
        for fd in self.files.values():
            os.close(fd)
        self.files.clear()

    def __del__(self):
        self.close()


def crc32c(data: np.ndarray | bytes, value: int = 0) -> int:
    """CRC32C of `data`'s bytes, continuing from `value` (no copy of an array's memory)."""
    if isinstance(data, np.ndarray):
        data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        data = data.view()
        data.flags.writeable = False  # the C extension takes read-only buffers only
    return google_crc32c.extend(value, data)


def shard_index(rows: int, variants: int, chunk_bytes: int, with_crc: bool) -> bytes:
    """The index of a shard whose chunks follow each other in C order: (offset, nbytes)
    little-endian uint64 per chunk, then the index's CRC32C when the index codecs say so."""
    offsets = np.arange(rows * variants, dtype="<u8") * np.uint64(chunk_bytes)
    index = np.stack([offsets, np.full_like(offsets, chunk_bytes)], axis=1).astype("<u8").tobytes()
    return index + (np.uint32(crc32c(index)).astype("<u4").tobytes() if with_crc else b"")


def write_shard(array: zarr.Array, array_url: str, shard: int, data: np.ndarray, storage_options=None) -> None:
    """Write shard `shard` of `array` (laid out as `direct_readable` says) from `data`, the
    shard's full (rows_per_shard, V, ...) block, C-contiguous, in the array's dtype. A local
    shard appears whole or not at all (written aside, then renamed)."""
    if tuple(data.shape) != tuple(array.shards) or data.dtype != array.dtype or not data.flags.c_contiguous:
        raise ValueError(f"shard {shard} of {array_url}: expected a C-contiguous {array.shards} {array.dtype} block, "
                         f"got {data.shape} {data.dtype}")
    sharding = array.metadata.codecs[0]
    with_crc = any(isinstance(c, Crc32cCodec) for c in sharding.index_codecs)
    index = shard_index(data.shape[0], data.shape[1], data[0, 0].nbytes, with_crc)
    url = join_url(array_url, array.metadata.chunk_key_encoding.encode_chunk_key((shard,) + (0,) * (array.ndim - 1)))
    body = memoryview(data.reshape(-1).view(np.uint8))
    if has_scheme(url):
        fs, path = url_to_fs(url, storage_options)
        with fs.open(path, "wb") as f:
            f.write(body)
            f.write(index)
        return
    os.makedirs(os.path.dirname(url), exist_ok=True)
    partial = f"{url}.{uuid.uuid4().hex}.partial"
    try:
        with open(partial, "wb", buffering=0) as f:
            for part in (body, memoryview(index)):
                while part:
                    part = part[f.write(part):]
        os.replace(partial, url)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
