"""One timed generate per call, for each mode, on an HF model."""
from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time

import numpy as np
import torch

import dmi
import dmi.plugins
import dmi.sinks.base

MODES = ("off", "dmi", "dmi-drop", "dmi-null", "dmi-discard", "dmi-pause", "dmi-keep-pages", "hf-hidden-states", "hf-attentions", "forward-hook-cpu",
         "nnsight", "off-graphs", "dmi-graphs", "hf-hidden-states-disk", "forward-hook-disk", "steer", "steer-mixed",
         "steer-graphs")
# *-disk: what users write by hand to keep the same data, persisted as dmi persists it (HDF5,
# timed until the file is written); dmi modes are likewise timed until their file is closed.
# *-graphs: generate with a static KV cache, which transformers compiles (mode "reduce-overhead":
# CUDA graphs) on a GPU; the same capture points then run inside the compiled decode step.
# steer*: interventions only, nothing captured: steer adds one vector to a middle layer's residual
# stream of every request; steer-mixed steers half the requests, each with its own vector (one
# intervention per request, one batch); steer-graphs is steer under the static-cache compile.


def unavailable(mode: str) -> str | None:
    """Why a mode can't run here, or None."""
    if mode == "nnsight":
        try:
            import nnsight  # noqa: F401
        except ImportError:
            return "skipped: nnsight not installed"
    return None


class PeakRSS:
    """Peak resident memory of this process while the block runs. On Linux the kernel keeps
    it (VmHWM, reset by writing 5 to /proc/self/clear_refs): no thread in the timed process.
    Elsewhere a thread samples RSS, which takes the GIL and a core's time from what is timed."""

    def __init__(self, every_s: float = 0.01):
        self.every_s = every_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = None

    @staticmethod
    def _status(field: str) -> int:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError):
            pass
        return 0

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def _loop(self):
        while not self._stop.wait(self.every_s):
            self.peak = max(self.peak, self._status("VmRSS"))

    def __enter__(self):
        self.peak = self._status("VmRSS")
        if not self._reset_hwm():
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        self.peak = max(self.peak, self._status("VmHWM" if self._thread is None else "VmRSS"))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def _forward_hooks_cpu(model):
    """The baseline people write by hand: a forward hook per layer copying to the CPU each step."""
    kept = []
    handles = [layer.register_forward_hook(lambda m, a, o: kept.append(o.detach().cpu()))
               for layer in model.model.layers]
    handles.append(model.lm_head.register_forward_hook(lambda m, a, o: kept.append(o.detach().cpu())))
    try:
        yield kept
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _attentions_cpu(model):
    """HF's output_attentions (needs eager attention), moved to the CPU every step."""
    kept = []
    impl = model.config._attn_implementation
    model.set_attn_implementation("eager")
    h = model.register_forward_hook(lambda m, a, o: kept.extend(x.detach().cpu() for x in o.attentions))
    try:
        yield {"output_attentions": True, "return_dict_in_generate": True}
    finally:
        h.remove()
        model.set_attn_implementation(impl)


_NNSIGHT: dict = {}


def _nnsight_generate(model, kwargs: dict, decode_len: int) -> None:
    """nnsight's way to the same data: every layer's output and the logits, to the CPU each step."""
    from nnsight import TransformersModel

    nm = _NNSIGHT.get(id(model))
    if nm is None:
        # a tokenizer is required by the wrapper, never used here (token ids go in directly)
        from transformers import AutoTokenizer

        from dmi.tiny import build_byte_tokenizer

        with tempfile.TemporaryDirectory(prefix="dmi-bench-tok-") as d:  # loaded whole: the folder can go
            tok = AutoTokenizer.from_pretrained(build_byte_tokenizer(d))
        nm = _NNSIGHT[id(model)] = TransformersModel(model, tokenizer=tok)
    ids = kwargs.pop("input_ids")
    with nm.generate(ids, **kwargs) as tracer:
        kept = list().save()
        for _ in tracer.iter[:decode_len]:
            for layer in nm.model.layers:
                kept.append(layer.output.cpu())
            kept.append(nm.lm_head.output.cpu())


@contextlib.contextmanager
def _hidden_states_cpu(model):
    """HF's own feature: output_hidden_states, moved to the CPU every step."""
    kept = []
    h = model.register_forward_hook(lambda m, a, o: kept.extend(x.detach().cpu() for x in o.hidden_states))
    try:
        yield {"output_hidden_states": True, "return_dict_in_generate": True}
    finally:
        h.remove()


def _write_h5(path: str, arrays: dict[str, torch.Tensor]) -> None:
    import h5py

    with h5py.File(path, "w") as f:
        for name, t in arrays.items():
            f.create_dataset(name, data=t.numpy())


def _hidden_states_disk(model, kwargs: dict, path: str) -> None:
    """By hand: generate with output_hidden_states and output_logits, then h5py."""
    out = model.generate(**kwargs, output_hidden_states=True, output_logits=True, return_dict_in_generate=True)
    layers = len(out.hidden_states[0]) - 1
    arrays = {f"layer{i}": torch.cat([step[i + 1].reshape(-1, step[i + 1].shape[-1]) for step in out.hidden_states])
              for i in range(layers)}
    arrays["logits"] = torch.stack(out.logits).reshape(-1, out.logits[0].shape[-1])
    _write_h5(path, arrays)


def _forward_hooks_disk(model, kwargs: dict, path: str) -> None:
    """By hand: a forward hook per layer and on lm_head keeping `.clone()`s, then h5py."""
    kept: dict[str, list] = {}

    def keep(name):
        def hook(m, a, o):
            t = o[0] if isinstance(o, tuple) else o
            kept.setdefault(name, []).append(t.detach().clone())
        return hook

    handles = [layer.register_forward_hook(keep(f"layer{i}")) for i, layer in enumerate(model.model.layers)]
    handles.append(model.lm_head.register_forward_hook(keep("logits")))
    try:
        model.generate(**kwargs)
    finally:
        for h in handles:
            h.remove()
    _write_h5(path, {k: torch.cat([t.reshape(-1, t.shape[-1]) for t in v]) for k, v in kept.items()})


class _DiscardSink(dmi.sinks.base.Sink):
    """dmi-discard: takes the drain's blocks and writes nothing, so a run pays for capture, plan,
    drain and gather but not for a file: what is left of `dmi` above it is the sink's."""

    commits_on_write = True

    def __init__(self):
        self._stage: dict[str, np.ndarray] = {}

    def open(self, meta) -> None:
        pass

    def write(self, block) -> None:
        pass

    def write_gaps(self, gaps) -> None:
        pass

    def close(self, stats, complete: bool = True) -> None:
        pass

    def staging(self, info, n, row_shape, dtype):
        # one buffer per hook, reused: the gather writes warm memory, as into a file sink's chunk buffer
        buf = self._stage.get(info.name)
        if buf is None or buf.shape[0] < n or buf.shape[1:] != tuple(row_shape) or buf.dtype != dtype:
            buf = self._stage[info.name] = np.empty((max(n, 1024), *row_shape), dtype)
        return buf[:n]


class _BenchSinks:
    """The benchmark's own sinks: a slow HDF5 sink (sleeps before each write: what a slow disk or
    network store looks like) and the discarding one. Registered in this process only, so an
    engine whose workers run elsewhere (SGLang's scheduler) can't use them."""

    @dmi.plugins.hookimpl
    def dmi_sink_for(self, sink_spec):
        kind = sink_spec.get("kind") if isinstance(sink_spec, dict) else None
        if kind == "bench-discard":
            return _DiscardSink()
        if kind != "bench-slow-hdf5":
            return None
        from dmi.sinks.hdf5 import HDF5Sink

        delay = sink_spec["delay_s"]

        class SlowHDF5Sink(HDF5Sink):
            def write(self, block):
                time.sleep(delay)
                super().write(block)

        return SlowHDF5Sink(sink_spec["path"], release_pages=sink_spec.get("release_pages", True))


def register_sinks() -> None:
    if not dmi.plugins.manager().has_plugin("matrix-bench-sinks"):
        dmi.plugins.manager().register(_BenchSinks(), name="matrix-bench-sinks")


def _sink(path: str, delay_s: float):
    if delay_s <= 0:
        return path
    register_sinks()
    return {"kind": "bench-slow-hdf5", "path": path, "delay_s": delay_s}


def run_once(model, mode: str, ids: torch.Tensor, decode_len: int, hooks: list[str], ring_bytes: int,
             workdir: str, sink_delay_s: float = 0.0) -> dict:
    """Time one generate of `decode_len` tokens under `mode`; returns seconds and capture facts."""
    device = ids.device
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=decode_len,
                  min_new_tokens=decode_len, do_sample=False, pad_token_id=0)
    facts = {"bytes_captured": 0, "rows_dropped": 0, "close_s": 0.0}
    ctx: contextlib.AbstractContextManager
    session = None
    if mode.endswith("-graphs"):
        kwargs["cache_implementation"] = "static"
    if mode in ("off", "off-graphs"):
        ctx = contextlib.nullcontext()
    elif mode.startswith("steer"):
        session = dmi.attach(model, steer_spec(mode, model, ids.shape[0], ring_bytes))
        path = None
        ctx = contextlib.nullcontext()
    elif mode in ("dmi", "dmi-drop", "dmi-null", "dmi-discard", "dmi-pause", "dmi-keep-pages", "dmi-graphs"):
        path = None  # dmi-discard: no file (capture_spec names its sink)
        if mode != "dmi-discard":
            fd, path = tempfile.mkstemp(suffix=".h5", dir=workdir)
            os.close(fd)
            os.unlink(path)
        session = dmi.attach(model, capture_spec(mode, hooks, ring_bytes, _sink(path, sink_delay_s)))
        ctx = contextlib.nullcontext()
    elif mode == "hf-hidden-states":
        ctx = _hidden_states_cpu(model)
    elif mode == "hf-attentions":
        ctx = _attentions_cpu(model)
    elif mode == "forward-hook-cpu":
        ctx = _forward_hooks_cpu(model)
    elif mode in ("nnsight", "hf-hidden-states-disk", "forward-hook-disk"):
        ctx = contextlib.nullcontext()
    else:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    with ctx as extra:
        if isinstance(extra, dict):
            kwargs.update(extra)
        _sync(device)
        with PeakRSS() as rss:
            t0, c0 = time.perf_counter(), time.process_time()
            with torch.no_grad():
                if mode == "nnsight":
                    _nnsight_generate(model, dict(kwargs), decode_len)
                elif mode.endswith("-disk"):
                    path = os.path.join(workdir, f"{mode}.h5")
                    (_hidden_states_disk if mode == "hf-hidden-states-disk" else _forward_hooks_disk)(model, kwargs,
                                                                                                       path)
                    os.unlink(path)
                else:
                    model.generate(**kwargs)
            _sync(device)
            if session is not None:  # persisted: timed until the file is closed, like the -disk baselines
                facts.update(close_facts(session))
                if path is not None:
                    os.unlink(path)
            seconds = time.perf_counter() - t0
            # CPU seconds of every thread of this process: what dmi's work costs, blind to the
            # time a shared machine's other tenants take (wall clock is not)
            facts["cpu_s"] = time.process_time() - c0
        facts["peak_rss"] = rss.peak
    return {"seconds": seconds, **facts}


def capture_spec(mode: str, hooks: list[str], ring_bytes: int, sink) -> dmi.CaptureSpec:
    """The spec of a dmi mode, for every engine."""
    if mode == "dmi-discard":  # everything but the sink's work (registered in this process only)
        register_sinks()
        sink = {"kind": "bench-discard"}
    if mode == "dmi-keep-pages":  # the file's written pages stay cached, behind a slow sink too
        sink = {**({"kind": "hdf5", "path": sink} if isinstance(sink, str) else sink), "release_pages": False}
    return dmi.CaptureSpec(hooks=hooks, ring={"bytes": ring_bytes}, sink=sink,
                           overload="drop" if mode == "dmi-drop" else "block",
                           # dmi-null: capture points armed and called, every row filtered out
                           requests={"ids": ["none"]} if mode == "dmi-null" else {},
                           # dmi-pause: the drain waits for the engine's pauses (drain.schedule)
                           drain={"schedule": "pause"} if mode == "dmi-pause" else {})


def steer_spec(mode: str, model, batch: int, ring_bytes: int) -> dmi.CaptureSpec:
    """Interventions only: an add-vector at the middle layer's residual stream (HF request ids
    are "0".."batch-1" in a fresh session)."""
    cfg = model.config
    hook = f"blocks.{cfg.num_hidden_layers // 2}.hook_resid_post"
    g = torch.Generator().manual_seed(0)

    def vec():
        return (0.1 * torch.randn(cfg.hidden_size, generator=g)).tolist()

    if mode == "steer-mixed":
        ivs = [{"hook": hook, "op": "add", "value": vec(), "requests": {"ids": [str(r)]}, "name": f"steer-{r}"}
               for r in range(max(1, batch // 2))]
    else:
        ivs = [{"hook": hook, "op": "add", "value": vec(), "name": "steer"}]
    # nothing is captured: a small ring (the session still plans every step)
    return dmi.CaptureSpec(hooks=[], ring={"bytes": min(ring_bytes, 1 << 20)}, sink="memory", interventions=ivs)


def close_facts(session) -> dict:
    """Close a dmi mode's session (writing out what it captured) and report what it captured."""
    t1 = time.perf_counter()
    session.close()
    close_s = time.perf_counter() - t1
    stats = session.stats()  # the final books, also for sessions in an engine's workers
    return {"close_s": close_s, "bytes_captured": stats["bytes_captured"], "rows_dropped": stats["rows"]["dropped"]}
