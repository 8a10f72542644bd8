"""A torch IterableDataset over one hook of a dmi dataset, for SAE (or probe) training.

    ds = ActivationDataset("s3://bucket/run", "blocks.3.hook_resid_post", batch_size=4096,
                           shuffle_buffer=1 << 16, storage_options={...})
    for batch in torch.utils.data.DataLoader(ds, batch_size=None, num_workers=4): ...

It streams the hook's shards (one in memory at a time per worker, plus the shuffle buffer),
so a dataset far bigger than memory trains fine. Shards are split across DataLoader workers
and, with rank/world_size, across training processes, so every row is seen once per epoch.
Rows are yielded in batches [batch_size, *row_shape] as float32 (bfloat16 rows converted), or
with with_index=True as (batch, request ids, positions).
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from dmi.reader.dataset import DatasetRun, read_safetensors, table_rows


class ActivationDataset(IterableDataset):
    def __init__(self, path: str | DatasetRun, hook: str, batch_size: int = 1024, shuffle_buffer: int = 0,
                 seed: int = 0, dtype: torch.dtype | None = torch.float32, drop_last: bool = False,
                 rank: int = 0, world_size: int = 1, storage_options: dict[str, Any] | None = None,
                 with_index: bool = False) -> None:
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0 (0: no shuffling), got {shuffle_buffer}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        run = path if isinstance(path, DatasetRun) else DatasetRun(path, storage_options)
        self._meta = run._meta_of(hook)  # unknown hook: KeyError with the close names
        if self._meta["ragged"]:
            raise ValueError(f"hook {hook!r} has ragged rows (one width per position); batches need one row "
                             f"shape: read it with dmi.open(...).stack({hook!r}) instead")
        self.path, self.hook, self.shards, self.fs = run.path, hook, run.shards_of(hook), run.fs
        self._qualified = run._qualified   # request ids as the run names them (rank-qualified if they clash)
        self.dtype_name = run.dtype(hook)
        self.batch_size, self.shuffle_buffer, self.seed = batch_size, shuffle_buffer, seed
        self.dtype, self.drop_last, self.with_index = dtype, drop_last, with_index
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self._rows_total = run.num_rows(hook)

    def set_epoch(self, epoch: int) -> None:
        """A new shuffle order per epoch (as DistributedSampler.set_epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        """Rows of the hook (all workers and ranks together)."""
        return self._rows_total   # from the manifests: no request per shard

    def _my_shards(self) -> list[tuple[str, int]]:
        info = get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info is not None else (0, 1)
        parts, part = self.world_size * nworkers, self.rank * nworkers + wid
        shards = list(self.shards)
        if self.shuffle_buffer:
            np.random.default_rng((self.seed, self.epoch)).shuffle(shards)
        return shards[part::parts]

    def _rows(self) -> Iterator[tuple[np.ndarray, list[str], np.ndarray]]:
        import pyarrow.parquet as pq

        for shard, rank in self._my_shards():
            if shard.endswith(".safetensors"):
                data, raw, pos, _ = read_safetensors(self.fs.cat_file(shard))
            else:
                t = pq.read_table(shard, filesystem=self.fs)
                data, raw, pos = table_rows(t, self._meta), t.column("request").to_pylist(), t.column("position").to_numpy()
            yield data, [self._qualified(rank, r) for r in raw], pos

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        rng = np.random.default_rng((self.seed, self.epoch, self.rank, info.id if info else 0))
        size = self.shuffle_buffer
        buf: list[tuple[np.ndarray, str, int]] = []
        pending: list[tuple[np.ndarray, str, int]] = []
        for data, reqs, pos in self._rows():
            for row in zip(data, reqs, pos.tolist()):
                if size:
                    # Streaming shuffle: once the buffer is full, each new row takes the place
                    # of a random buffered one, which goes out.
                    if len(buf) < size:
                        buf.append(row)
                        continue
                    j = int(rng.integers(size))
                    pending.append(buf[j])
                    buf[j] = row
                else:
                    pending.append(row)
                if len(pending) == self.batch_size:
                    yield self._batch(pending)
                    pending = []
        if buf:
            pending.extend(buf[i] for i in rng.permutation(len(buf)))
        for s in range(0, len(pending), self.batch_size):
            chunk = pending[s:s + self.batch_size]
            if len(chunk) < self.batch_size and self.drop_last:
                break
            yield self._batch(chunk)

    def _batch(self, rows: list[tuple[np.ndarray, str, int]]) -> Any:
        batch = self._tensor(np.stack([r[0] for r in rows]))
        if self.with_index:
            return batch, [r[1] for r in rows], torch.tensor([r[2] for r in rows], dtype=torch.int64)
        return batch

    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a))
        if self.dtype_name == "bfloat16":
            t = t.view(torch.bfloat16)
        return t.to(self.dtype) if self.dtype is not None else t
