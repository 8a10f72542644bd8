"""A file sink hands its written pages back to the kernel once they reach the disk
(dmi.sinks.pagecache), and its rows stay exact."""
from __future__ import annotations

import ctypes
import logging
import mmap
import os

import numpy as np
import pytest
import torch

import dmi
from dmi.errors import SpecError
from dmi.reader import open_run
from dmi.sinks import pagecache
from dmi.sinks.base import HookInfo, RowBlock, RunMeta
from dmi.sinks.hdf5 import HDF5Sink

pytestmark = pytest.mark.skipif(not pagecache.supported(), reason="posix_fadvise/sync_file_range: Linux only")

INFO = HookInfo("blocks.0.hook_resid_post", "float32", (1024,))
ROWS_PER_BLOCK = 64            # 256 KiB a block
BLOCKS = 96                    # 24 MiB in all


def _resident(path: str) -> int:
    """Bytes of `path` in the page cache: mincore over a read-only mapping of it."""
    size = os.path.getsize(path)
    page = mmap.PAGESIZE
    vec = (ctypes.c_ubyte * ((size + page - 1) // page))()
    libc = ctypes.CDLL(None, use_errno=True)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as mm:
        view = np.frombuffer(mm, dtype=np.uint8)
        addr = view.__array_interface__["data"][0]
        try:
            if libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
        finally:
            del view
    return sum(v & 1 for v in vec) * page


@pytest.fixture
def drops_pages(tmp_path):
    """Skip where the filesystem keeps a file's pages whatever we ask (tmpfs, ramfs)."""
    probe = tmp_path / "probe.bin"
    with open(probe, "wb") as f:
        f.write(os.urandom(4 << 20))
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    if _resident(str(probe)) > (1 << 20):
        pytest.skip("this filesystem keeps written pages in memory (tmpfs?)")
    probe.unlink()


def _meta() -> RunMeta:
    return RunMeta(dmi_version="0.1.0", engine="hf", model="m", model_config={}, spec_json="{}")


def _write(sink: HDF5Sink, rng) -> np.ndarray:
    rows = []
    for b in range(BLOCKS):
        data = rng.standard_normal((ROWS_PER_BLOCK, 1024), dtype=np.float32)
        rows.append(data)
        n = ROWS_PER_BLOCK
        sink.write(RowBlock(hook=INFO, data=data, request_index=np.zeros(n, np.int32), request_ids=["r"],
                            position=np.arange(b * n, (b + 1) * n, dtype=np.int64), step=np.full(n, b, np.int64)))
    return np.concatenate(rows)


@pytest.mark.parametrize("release", [True, False])
def test_written_pages_leave_the_page_cache_and_rows_stay_exact(tmp_path, drops_pages, release):
    path = str(tmp_path / "run.h5")
    sink = HDF5Sink(path, release_pages=release)
    sink.pages.every = 1 << 20
    sink.open(_meta())
    expected = _write(sink, np.random.default_rng(0))
    sink.flush()
    # once the disk has them, one more release drops every page written so far
    os.fsync(sink._file.id.get_vfd_handle())
    sink.pages.release()
    resident = _resident(path)
    size = os.path.getsize(path)
    assert size >= expected.nbytes
    if release:
        assert sink.pages.releases >= BLOCKS // 4 + 1
        assert resident < size // 8, (resident, size)
    else:
        assert sink.pages.releases == 0
        assert resident > size // 2, (resident, size)   # the control: without it, the pages stay
    sink.close({})
    with open_run(path) as run:
        np.testing.assert_array_equal(run.get(INFO.name, "r").numpy(), expected)


def test_a_failing_release_turns_itself_off_and_never_fails_a_write(tmp_path, caplog):
    def no_fd():
        raise OSError(9, "bad file descriptor")

    pages = pagecache.PageRelease(no_fd, every=10)
    with caplog.at_level(logging.INFO, logger="dmi"):
        pages.wrote(100)
        pages.wrote(100)
    assert not pages.enabled and pages.releases == 0
    assert sum("not releasing written pages" in r.message for r in caplog.records) == 1


def test_capture_through_a_session_releases_pages(tmp_path, load):
    model = load("qwen3")
    out = str(tmp_path / "s.h5")
    with dmi.attach(model, {"hooks": ["blocks.*.hook_resid_post"], "sink": {"kind": "hdf5", "path": out}}) as s:
        s.sink.pages.every = 4096   # the tiny model writes little: release at every append
        model.generate(input_ids=torch.tensor([[5, 6, 7, 8]]), max_new_tokens=8, do_sample=False, pad_token_id=257,
                       eos_token_id=319)
    assert s.sink.pages.releases > 0
    with open_run(out) as run:
        assert len(run.requests) == 1


def test_unknown_hdf5_sink_fields_are_refused():
    with pytest.raises(SpecError, match=r"unknown field\(s\) \['relase_pages'\] for the HDF5 sink; valid: .*release_pages"):
        dmi.plugins.sink_for({"kind": "hdf5", "path": "x.h5", "relase_pages": False})


@pytest.mark.parametrize("release", [True, False])
def test_dataset_shards_leave_the_page_cache_and_rows_stay_exact(tmp_path, drops_pages, release):
    pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from dmi.sinks.dataset import DatasetSink

    sink = DatasetSink(str(tmp_path / "ds"), encode_threads=0, release_pages=release)
    sink.open(_meta())
    expected = _write(sink, np.random.default_rng(1))
    h = sink._hooks[INFO.name]   # the shard still open: 24 MiB in three row groups
    os.fsync(h.out.fileno())
    if release:
        assert h.pages.releases >= 2
        h.pages.release()
    resident, size = _resident(h.tmp), os.path.getsize(h.tmp)
    assert size >= expected.nbytes
    if release:
        assert resident < size // 8, (resident, size)
    else:
        assert resident > size // 2, (resident, size)
    sink.close({})
    shards = sorted((tmp_path / "ds" / INFO.name).glob("*.parquet"))
    got = np.concatenate([np.stack(pq.read_table(p).column("data").to_numpy(zero_copy_only=False)) for p in shards])
    np.testing.assert_array_equal(got.astype(np.float32), expected)
