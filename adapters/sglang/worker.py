"""The scheduler-side adapter: forward hooks on SGLang's model modules, one dmi step per
`ModelRunner.forward` (the step hook in srt_plugin.py calls begin/end here).

It runs in the scheduler process, next to the model, under an ordinary dmi Session.
"""
from __future__ import annotations

import functools

import torch

from dmi.adapter import Adapter
from dmi.plan import LOGITS

from . import edits as sglang_edits
from .hooks import HookMap, SBinding
from .rows import Coverage, row_table
from .tables import BUILTIN_TABLES


def table_for(hf_config, tables=BUILTIN_TABLES):
    """The table serving this model's architecture, or None."""
    arch = (getattr(hf_config, "architectures", None) or ["?"])[0]
    for t in tables:
        if arch in t.architectures:
            return t
    return None


class SGLangWorkerAdapter(Adapter):
    engine_name = "sglang"
    supports_interventions = True

    def __init__(self, runner, table, model_path: str = "", in_flight=(), tp: tuple[int, int] = (1, 0)):
        super().__init__(runner)
        self.runner = runner
        self.model = runner.model
        self.hf_config = runner.model_config.hf_config
        self.tp_size, self.tp_rank = tp
        p = next(self.model.parameters(), None)
        self.map = HookMap(table, self.hf_config, p.element_size() if p is not None else 4,
                           dtype=p.dtype if p is not None else torch.float32, tp_size=self.tp_size,
                           tp_rank=self.tp_rank, model=self.model)
        self.model_path = model_path
        self.session = None
        self.coverage = Coverage(started=in_flight)
        self.requests = None  # dmi.serve.engine.RequestTable, once armed
        self._handles: list = []

    @property
    def device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def describe(self) -> tuple[str, dict]:
        return self.model_path or type(self.model).__name__, self.hf_config.to_dict()

    def run_attrs(self) -> dict:
        return {"tp_rank": self.tp_rank, "tp_size": self.tp_size} if self.tp_size > 1 else {}

    def resolve(self, patterns):
        return self.map.resolve(patterns)

    def bind(self, patterns):
        return self.map.bind(patterns)

    def editable(self, b: SBinding) -> str | None:
        where = sglang_edits.site(b)
        return where if isinstance(where, str) else None

    # -- arming -----------------------------------------------------------------------
    def arm(self, session, bindings: list[SBinding]) -> None:
        try:
            # Edits first: a capture on the same module then sees the edited value ("after"),
            # except where the spec asks for "before" (that hook's edits go after its capture).
            edited = session.edits.hooks if session.edits is not None else {}
            if edited:
                sglang_edits.check(session.edits)
            late = []
            for he in edited.values():
                if he.before:
                    late.append(he)
                else:
                    self._arm_edit(he)
            for i, b in enumerate(bindings):
                mod = self.model.get_submodule(b.where.module)
                fn = functools.partial(_capture, self, i, b)
                if b.where.io == "input":
                    h = mod.register_forward_pre_hook(lambda m, a, k, _fn=fn: _fn(a, k, None), with_kwargs=True)
                else:
                    h = mod.register_forward_hook(lambda m, a, k, o, _fn=fn: _fn(a, k, o), with_kwargs=True)
                self._handles.append(h)
            for he in late:
                self._arm_edit(he)
        except BaseException:
            self.disarm()
            raise
        from dmi.serve.engine import RequestTable

        self.requests = RequestTable(session.names, session.edits.banks if session.edits is not None else None)
        session.planner.enable_request_masks(self.requests.masks)
        self.session = session  # last: the step hook only acts once every capture point is in place

    def _arm_edit(self, he) -> None:
        module, io, mode = sglang_edits.site(he.binding)
        mod = self.model.get_submodule(module)
        view = functools.partial(_edit_view, he.binding, self.map.dims)
        fn = functools.partial(sglang_edits.hook, self, he, mode, view)
        if io == "input":
            h = mod.register_forward_pre_hook(lambda m, a, k, _fn=fn: _fn(a, k, None), with_kwargs=True)
        else:
            h = mod.register_forward_hook(lambda m, a, k, o, _fn=fn: _fn(a, k, o), with_kwargs=True)
        self._handles.append(h)

    def disarm(self) -> None:
        self.session = None
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def flush(self) -> None:
        if self.device.type == "cuda":  # captures are enqueued on the forward's stream
            torch.cuda.synchronize(self.device)

    def failed(self, what: str, e: Exception) -> None:
        """Report a capture that raised, once per hook; the engine goes on without it."""
        s = self.session
        if s is not None:
            s._warn_once("sglang:" + what, f"dmi: capturing {what} on SGLang failed, its rows are missing from "
                                           f"this step on: {type(e).__name__}: {e}")

    # -- step boundaries (called around ModelRunner.forward) ----------------------------
    def begin(self, fb) -> bool:
        """Open the step; False (reported) when its rows cannot be attributed."""
        try:
            self._begin(fb)
            return True
        except Exception as e:
            self.failed("the step's rows", e)
            return False

    def _begin(self, fb) -> None:
        from . import control

        s = self.session
        # Row ids, not rids: a client may send a rid again once its first request ended (names.py).
        names = [control.row_name(str(r)) for r in (fb.rids or [])]
        for name in names:
            self.requests.add(name, control.request_info(name))
        # A radix-cache hit never covers a position with a logits row (the engine always computes
        # the prompt's last token): those gaps belong to the token hooks only.
        tokens = [i for i, b in enumerate(s.bindings) if b.group != LOGITS]
        for rid, pos, reason in self.coverage.step(fb, names):
            s.not_computed(rid, pos, reason, hooks=tokens if reason == "prefix_cache" else None, edits=True)
        n = int(fb.input_ids.shape[0]) if fb.input_ids is not None else int(fb.positions.shape[0])
        rows, last = row_table(fb, n, self.coverage.before, names)
        # The logits processor computes one row per request, at its last row of the step.
        s.begin_step(rows, {LOGITS: rows.take(last)})

    def end(self) -> None:
        if self.session is not None:
            self.session.end_step()


def _pick(b: SBinding, args: tuple, kwargs: dict, output):
    w = b.where
    if w.io == "input":
        if isinstance(w.index, int) and len(args) > w.index:
            return args[w.index]
        return kwargs.get("hidden_states")
    if isinstance(w.index, str):
        return getattr(output, w.index, None)
    if w.index is None:
        return output[0] if isinstance(output, (tuple, list)) else output
    if isinstance(output, (tuple, list)):
        return output[w.index] if len(output) > w.index else None
    return output if w.index == 0 else None


def _view(b: SBinding, x: torch.Tensor, d) -> torch.Tensor:
    v = b.tap.view
    if v is None or v == "last_rows":
        return x
    if v == "heads":
        return x.unflatten(-1, (d.n_heads, d.head_dim))
    if v == "kv_heads":
        return x.unflatten(-1, (d.n_kv_heads, d.head_dim))
    if v == "rows_heads":
        return x.reshape(-1, d.n_heads, d.head_dim)
    if v == "rows_kv_heads":
        return x.reshape(-1, d.n_kv_heads, d.head_dim)
    if v in ("gate", "up"):
        half = x.shape[-1] // 2
        return x[:, :half] if v == "gate" else x[:, half:]
    q, kv = d.n_heads * d.head_dim, d.n_kv_heads * d.head_dim
    if v == "q":
        return x[:, :q].unflatten(-1, (d.n_heads, d.head_dim))
    if v == "k":
        return x[:, q:q + kv].unflatten(-1, (d.n_kv_heads, d.head_dim))
    if v == "v":
        return x[:, q + kv:q + 2 * kv].unflatten(-1, (d.n_kv_heads, d.head_dim))
    raise ValueError(f"unknown SGLang tap view {v!r}")


def _edit_view(b: SBinding, d, x: torch.Tensor) -> torch.Tensor:
    """An edited tensor as rows [tokens, *row] (a pure reshape of it)."""
    return _view(b, x, d).reshape(x.shape[0], *b.row_shape)


def _capture(adapter: SGLangWorkerAdapter, i: int, b: SBinding, args, kwargs, output) -> None:
    s = adapter.session
    if s is None or not s.wants(i):
        return
    try:
        _capture_one(adapter, s, i, b, args, kwargs, output)
    except Exception as e:  # an exception here would take the scheduler, and the engine, down
        adapter.failed(b.name, e)


def _capture_one(adapter, s, i, b, args, kwargs, output) -> None:
    x = _pick(b, args, kwargs, output)
    if not isinstance(x, torch.Tensor):
        return
    x = x.detach()
    if b.factor is not None:
        x = x * b.factor
    s.capture(i, _view(b, x, adapter.map.dims), flat=True)
