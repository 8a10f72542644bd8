"""The dataset sink: sharded Parquet + manifests through fsspec, read by dmi.open, datasets,
PyArrow, Ray Data and a torch DataLoader; written by two processes to a local S3 server."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

pa = pytest.importorskip("pyarrow")
pytest.importorskip("fsspec")

import dmi  # noqa: E402
from dmi import plugins  # noqa: E402
from dmi.errors import SinkPathError  # noqa: E402
from dmi.sinks.dataset import DatasetSink  # noqa: E402
from dmi.testing import run_read_back, run_sink_conformance  # noqa: E402


def test_dataset_sink_conformance_with_rollover(tmp_path):
    run_sink_conformance(lambda d: DatasetSink(str(d / "ds"), shard_bytes=300),
                         lambda d: run_read_back(dmi.open(str(d / "ds"))), tmp_path)
    manifest = json.loads((tmp_path / "ds" / "_manifest.rank00000.json").read_text())
    assert manifest["complete"] is True
    listed = sorted(s["path"] for s in manifest["shards"])
    on_disk = sorted(os.path.relpath(os.path.join(r, f), tmp_path / "ds").replace(os.sep, "/")
                     for r, _, fs in os.walk(tmp_path / "ds") for f in fs if not f.startswith("_manifest"))
    assert listed == on_disk                                   # no temp files, nothing unlisted
    resid = [s for s in manifest["shards"] if s["hook"] == "blocks.0.hook_resid_post"]
    assert len(resid) >= 2 and all(s["rows"] > 0 for s in resid)  # rolled over by size


def test_registered_and_refuses_to_overwrite_a_rank(tmp_path):
    sink = plugins.sink_for({"kind": "dataset", "path": str(tmp_path / "ds"), "rank": 3})
    assert isinstance(sink, DatasetSink) and sink.rank == 3
    run_sink_conformance(lambda d: sink, lambda d: run_read_back(dmi.open(str(d / "ds"))), tmp_path)
    with pytest.raises(SinkPathError, match=r"already holds a run of rank 3.*overwrite: true"):
        plugins.sink_for({"kind": "dataset", "path": str(tmp_path / "ds"), "rank": 3})
    plugins.sink_for({"kind": "dataset", "path": str(tmp_path / "ds"), "rank": 4})   # another writer: fine
    spec = dmi.CaptureSpec(sink={"kind": "dataset", "path": str(tmp_path / "ds"), "rank": 3}, overwrite=True)
    assert plugins.sink_for(spec.sink).overwrite
    with pytest.raises(ValueError, match="valid: kind, path, rank"):
        plugins.sink_for({"kind": "dataset", "path": "x", "shard_size": 1})


CRASH = textwrap.dedent(r"""
    import os, sys
    import numpy as np
    import dmi
    from dmi.sinks.base import HookInfo, RowBlock, RunMeta
    from dmi.sinks.dataset import DatasetSink

    calls = []
    real_put = DatasetSink._put
    def put(self, name, payload):
        calls.append(name)
        if len(calls) == int(sys.argv[2]):        # die half way through writing this object
            path = self._join(name)
            tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".dead.tmp")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(payload[: len(payload) // 2])
            os._exit(9)
        return real_put(self, name, payload)
    DatasetSink._put = put
    sink = DatasetSink(sys.argv[1], shard_bytes=4 * 64)
    sink.open(RunMeta("0", "t", "m", {}, dmi.CaptureSpec().to_json()))
    info = HookInfo("blocks.0.hook_resid_post", "float32", (16,))
    for step in range(40):
        sink.write(RowBlock(info, np.full((1, 16), step, np.float32), ["a"], np.array([step]), np.array([step])))
""")


def test_crash_leaves_only_complete_listed_shards(tmp_path):
    """Killed half way through rewriting its manifest (the 6th object through _put; a shard
    was just renamed into place, rows sit in the buffer): the dataset still opens, the last
    whole manifest lists only whole shards, and every listed row is intact."""
    import pyarrow.dataset as pads

    out = tmp_path / "ds"
    r = subprocess.run([sys.executable, "-c", CRASH, str(out), "6"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 9, r.stderr[-2000:]
    run = dmi.open(str(out))
    assert not run.complete
    rows = run.get("blocks.0.hook_resid_post", "a")
    n = len(rows)
    assert n >= 4 and n % 4 == 0                                        # whole shards only
    assert torch.equal(rows, torch.arange(n, dtype=torch.float32)[:, None].expand(n, 16))
    visible = pads.dataset(str(out / "blocks.0.hook_resid_post"), format="parquet")   # hides ".tmp" names
    assert visible.count_rows() >= n


# -- two ranks to a local S3 server ---------------------------------------------------------------

PROMPTS = {0: [[11, 12, 13, 14, 15], [21, 22, 23]], 1: [[31, 32, 33, 34], [41, 42, 43, 44, 45, 46], [51, 52]]}
HOOKS = ["blocks.*.hook_resid_post", "hook_logits", "blocks.0.attn.hook_pattern"]

RANK = textwrap.dedent(r"""
    import json, sys, torch, dmi
    from transformers import AutoModelForCausalLM
    model_dir, url, options, rank, h5, prompts, hooks = sys.argv[1:]
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    prompts, hooks, rank = json.loads(prompts), json.loads(hooks), int(rank)
    width = max(map(len, prompts))
    ids = torch.tensor([[257] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    sinks = [{"kind": "dataset", "path": url, "rank": rank, "storage_options": json.loads(options),
              "shard_bytes": 8192}, h5]
    for sink in sinks:   # the same capture twice: to the dataset on S3 and to an HDF5 file
        with dmi.attach(model, dmi.CaptureSpec(hooks=hooks, sink=sink)):
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                           pad_token_id=257, eos_token_id=319)
""")


@pytest.fixture(scope="module")
def s3_run(tiny_dirs, tmp_path_factory):
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    import logging

    import s3fs

    logging.getLogger("werkzeug").setLevel(logging.ERROR)   # one line per S3 request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint,
                                                                         "region_name": "us-west-2"}}
    fs = s3fs.S3FileSystem(**options)
    fs.mkdir("dmi-test")
    url = "s3://dmi-test/runs/r1"
    tmp = tmp_path_factory.mktemp("s3run")
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    procs = [subprocess.Popen([sys.executable, "-c", RANK, str(tiny_dirs["qwen3"]), url, json.dumps(options), str(r),
                               str(tmp / f"rank{r}.h5"), json.dumps(PROMPTS[r]), json.dumps(HOOKS)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for r in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    try:
        yield {"url": url, "options": options, "fs": fs, "h5": [dmi.open(str(tmp / f"rank{r}.h5")) for r in (0, 1)]}
    finally:
        server.stop()


def _expected(h5_runs) -> dict:
    """(hook, dataset request id, position) -> row, from the HDF5 runs of the same capture.
    Both ranks' HF sessions number requests from "0", so the dataset qualifies them by rank."""
    out = {}
    for rank, run in enumerate(h5_runs):
        for hook in run.hooks:
            for r in run.requests:
                for pos, row in zip(run.positions(hook, r).tolist(), run.get(hook, r)):
                    out[(hook, f"rank{rank}/{r}", pos)] = row.numpy()
    return out


def _assert_rows_equal(expected: dict, hook: str, rank_of_row, requests, positions, rows) -> int:
    n = 0
    for rank, req, pos, row in zip(rank_of_row, requests, positions, rows):
        want = expected[(hook, f"rank{rank}/{req}", int(pos))]
        row = np.asarray(row).reshape(want.shape[:-1] + (-1,)) if want.ndim else np.asarray(row)
        w = min(row.shape[-1], want.shape[-1])   # ragged: the written row is zero-padded to its block
        assert np.array_equal(row[..., :w], want[..., :w]), (hook, req, pos)
        assert not row[..., w:].any() and not want[..., w:].any()
        n += 1
    return n


def _rank_of(paths_per_row):
    return [int(os.path.basename(p).split("-")[0][len("rank"):]) for p in paths_per_row]


def test_s3_dmi_open_reads_both_ranks_as_one_run(s3_run):
    run = dmi.open(s3_run["url"], storage_options=s3_run["options"])
    h0, h1 = s3_run["h5"]
    assert run.complete and run.meta["ranks"] == [0, 1] and run.meta["request_ids_qualified"]
    assert run.requests == [f"rank0/{r}" for r in h0.requests] + [f"rank1/{r}" for r in h1.requests]
    assert run.hooks == h0.hooks
    for rank, h5 in enumerate((h0, h1)):
        for hook in h5.hooks:
            for r in h5.requests:
                q = f"rank{rank}/{r}"
                assert torch.equal(run.positions(hook, q), h5.positions(hook, r))
                assert torch.equal(run.steps(hook, q), h5.steps(hook, r))
                assert torch.equal(run.get(hook, q), h5.get(hook, r)), (hook, q)
    assert run.stats["rows"]["written"] == h0.stats["rows"]["written"] + h1.stats["rows"]["written"]
    values, mask = run.stack("blocks.1.hook_resid_post")
    assert values.shape[0] == 5 and torch.equal(values[4][mask[4]], h1.get("blocks.1.hook_resid_post", "2"))
    # Each rank writes its own shards. (How many depends on how the drain batched steps into
    # blocks, a block is never split; rollover by size is tested with fixed blocks above.)
    assert {_rank_of([p])[0] for p in run.shard_paths("hook_logits")} == {0, 1}


def test_s3_pyarrow_and_datasets_read_every_row(s3_run, tmp_path):
    import pyarrow.dataset as pads

    run = dmi.open(s3_run["url"], storage_options=s3_run["options"])
    expected = _expected(s3_run["h5"])
    for hook in ("blocks.1.hook_resid_post", "hook_logits", "blocks.0.attn.hook_pattern"):
        paths = run.shard_paths(hook)
        seen = 0
        for p in paths:   # pyarrow.dataset over the S3 filesystem, one shard at a time keeps the rank
            t = pads.dataset(p, format="parquet", filesystem=s3_run["fs"]).to_table()
            seen += _assert_rows_equal(expected, hook, _rank_of([p]) * t.num_rows, t["request"].to_pylist(),
                                       t["position"].to_pylist(), t["data"].to_pylist())
        assert seen == sum(1 for k in expected if k[0] == hook)
    datasets = pytest.importorskip("datasets")
    hook = "blocks.1.hook_resid_post"
    paths = run.shard_paths(hook)
    ds = datasets.load_dataset("parquet", data_files=["s3://" + p for p in paths], split="train",
                               storage_options=copy.deepcopy(s3_run["options"]), cache_dir=str(tmp_path / "hf"))
    # (a copy: datasets adds its own keys to the dict it is given)
    assert ds.num_rows == sum(1 for k in expected if k[0] == hook)
    counts = [pads.dataset(p, format="parquet", filesystem=s3_run["fs"]).count_rows() for p in paths]
    ranks = [r for p, c in zip(paths, counts) for r in _rank_of([p]) * c]   # data_files order is kept
    _assert_rows_equal(expected, hook, ranks, ds["request"], ds["position"], ds.with_format("numpy")["data"])


def test_s3_ray_data_reads_every_row(s3_run):
    ray = pytest.importorskip("ray")
    import pyarrow.fs as pafs

    run = dmi.open(s3_run["url"], storage_options=s3_run["options"])
    expected = _expected(s3_run["h5"])
    hook = "hook_logits"
    ray.init(address="local", num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False, configure_logging=False)
    try:
        fs = pafs.PyFileSystem(pafs.FSSpecHandler(s3_run["fs"]))
        ds = ray.data.read_parquet(run.shard_paths(hook), filesystem=fs, include_paths=True)
        rows = ds.take_all()
    finally:
        ray.shutdown()
    assert len(rows) == sum(1 for k in expected if k[0] == hook)
    _assert_rows_equal(expected, hook, _rank_of([r["path"] for r in rows]), [r["request"] for r in rows],
                       [r["position"] for r in rows], [r["data"] for r in rows])


def test_dataloader_trains_a_tiny_sae(s3_run):
    from torch.utils.data import DataLoader

    from dmi.reader.torch_data import ActivationDataset

    hook = "blocks.1.hook_resid_post"
    ds = ActivationDataset(s3_run["url"], hook, batch_size=8, shuffle_buffer=16, seed=0,
                           storage_options=s3_run["options"], with_index=True)
    expected = _expected(s3_run["h5"])
    n_rows = sum(1 for k in expected if k[0] == hook)
    assert len(ds) == n_rows
    seen = [(req, int(p)) for _, reqs, pos in DataLoader(ds, batch_size=None) for req, p in zip(reqs, pos)]
    assert sorted(seen) == sorted((k[1], k[2]) for k in expected if k[0] == hook)   # every row once
    assert seen != sorted(seen)                                                   # shuffled
    torch.manual_seed(0)
    d = s3_run["h5"][0].shape(hook)[-1]
    enc, dec = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=3e-3)
    loader = DataLoader(ActivationDataset(s3_run["url"], hook, batch_size=16, shuffle_buffer=32,
                                          storage_options=s3_run["options"]), batch_size=None)
    losses = []
    for epoch in range(15):
        for x in loader:
            z = torch.relu(enc(x))
            loss = ((dec(z) - x) ** 2).mean() + 1e-4 * z.abs().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3]), losses


def test_bytes_value_encoding_reads_back_everywhere(tmp_path):
    """value_encoding "bytes": rows as raw bytes (fixed-size binary); dmi.open, PyArrow and
    datasets (through decode_rows) give the same rows, bf16 and ragged hooks included."""
    import pyarrow.dataset as pads

    from dmi.reader.dataset import decode_rows

    run_sink_conformance(lambda d: DatasetSink(str(d / "ds"), shard_bytes=300, value_encoding="bytes"),
                         lambda d: run_read_back(dmi.open(str(d / "ds"))), tmp_path)
    run = dmi.open(str(tmp_path / "ds"))
    manifest = json.loads((tmp_path / "ds" / "_manifest.rank00000.json").read_text())
    assert manifest["format_version"] == 2
    assert manifest["hooks"]["blocks.0.hook_resid_post"]["encoding"] == "bytes"
    assert manifest["hooks"]["blocks.0.attn.hook_pattern"]["encoding"] == "list"   # ragged: always lists
    for hook in ("blocks.0.hook_resid_post", "blocks.0.attn.hook_q"):
        meta = run.manifests[0]["hooks"][hook]
        t = pads.dataset(run.shard_paths(hook), format="parquet").to_table()
        assert pa.types.is_fixed_size_binary(t.schema.field("data").type)
        rows = decode_rows(t["data"], meta["dtype"], meta["row_shape"])
        for req, pos, row in zip(t["request"].to_pylist(), t["position"].to_pylist(), rows):
            want = run.get(hook, req)[run.positions(hook, req).tolist().index(pos)]
            if meta["dtype"] == "bfloat16":
                want = want.view(torch.int16).numpy().view(np.uint16)
            assert np.array_equal(row, np.asarray(want)), (hook, req, pos)
    datasets = pytest.importorskip("datasets")
    hook = "blocks.0.hook_resid_post"
    ds = datasets.load_dataset("parquet", data_files=run.shard_paths(hook), split="train",
                               cache_dir=str(tmp_path / "hf"))
    got = decode_rows(ds["data"], "float32", [8])
    want = np.stack([run.get(hook, r)[run.positions(hook, r).tolist().index(p)].numpy()
                     for r, p in zip(ds["request"], ds["position"])])
    assert got.shape == (ds.num_rows, 8) and np.array_equal(got, want)


def test_value_encoding_is_checked():
    with pytest.raises(ValueError, match="sink.value_encoding.*list, bytes"):
        plugins.sink_for({"kind": "dataset", "path": "/tmp/x-never-created", "value_encoding": "raw"})


def test_a_row_group_that_fails_to_encode_loses_only_its_hook(tmp_path, monkeypatch):
    """Row groups are encoded on threads: a failure there surfaces in the sink thread, the
    hook's shard is dropped whole (no temporary file, nothing listed), the other hooks' rows are
    published, and the run is not marked complete."""
    import dmi.sinks.dataset as dsmod
    from dmi.sinks.base import HookInfo, RowBlock, RunMeta

    real = dsmod._write_row_group

    def failing(writer, table, before):
        if json.loads(table.schema.metadata[b"dmi"])["hook"] == "bad":
            raise OSError("encoder ran out of memory")
        real(writer, table, before)

    monkeypatch.setattr(dsmod, "_write_row_group", failing)
    sink = DatasetSink(str(tmp_path / "ds"), encode_threads=2)
    sink.open(RunMeta("0", "t", "m", {}, dmi.CaptureSpec().to_json()))
    rows = np.arange(64 * 1024, dtype=np.float32).reshape(64, 1024)   # 256 KiB a block
    for step in range(40):                                            # 10 MiB a hook: row groups before close
        for hook in ("good", "bad"):
            sink.write(RowBlock(HookInfo(hook, "float32", (1024,)), rows, [str(step)] * 64, np.arange(64),
                                np.full(64, step)))
    with pytest.raises(OSError, match="out of memory"):
        sink.close({}, complete=True)
    manifest = json.loads((tmp_path / "ds" / "_manifest.rank00000.json").read_text())
    assert manifest["complete"] is False
    assert {s["hook"] for s in manifest["shards"]} == {"good"}
    assert sum(s["rows"] for s in manifest["shards"]) == 40 * 64
    left = [f for _, _, fs in os.walk(tmp_path / "ds") for f in fs if f.endswith(".tmp")]
    assert left == []
    run = dmi.open(str(tmp_path / "ds"))
    assert torch.equal(run.get("good", "7"), torch.from_numpy(rows))
