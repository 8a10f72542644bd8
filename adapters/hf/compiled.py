"""Step boundaries of an HF model that runs compiled, kept outside the compiled code.

dmi plans each step on the host before the forward and seals it after; no dmi Python may run
inside a compiled forward (a CUDA graph would replay none of it). Where the compiled call is
reachable, the boundary wraps it from outside:
- transformers' own compile (`generate(cache_implementation="static")`): `get_compiled_call`
  is wrapped so the compiled `__call__` it returns is bracketed by begin/end;
- `model.compile()`: the compiled `_compiled_call_impl` is bracketed the same way;
- `torch.compile(model)`: the OptimizedModule (passed to attach, or found at attach) gets
  pre/post hooks of its own, which run eagerly around the compiled forward.
The model's own root hooks then see that a boundary is open and do nothing. A model compiled
whole in a way dmi cannot reach (an OptimizedModule made after attach) runs the boundary as a
function dynamo must not trace: a graph break at the start and end of the forward, or, under
`fullgraph=True`, dynamo's error naming that function.

Dynamo by default does not guard on module hooks, so a graph compiled before attach would run
on without dmi's capture points, silently. Attaching turns those guards on (once per process):
graphs recompile once with the capture points and once more without them after detach, then
replay.
"""
from __future__ import annotations

import functools
import gc
import logging

import torch

log = logging.getLogger("dmi")


def ensure_hook_guards() -> None:
    cfg = torch._dynamo.config
    if getattr(cfg, "skip_nnmodule_hook_guards", False):
        cfg.skip_nnmodule_hook_guards = False
        # Graphs compiled before this point carry no guard on hooks: they would skip the
        # capture points we are about to add. Recompiling them is the only exact choice.
        torch._dynamo.reset()
        log.info("dmi: torch._dynamo now guards on module hooks (skip_nnmodule_hook_guards=False); "
                 "graphs compiled before attach recompile once")


def optimized_wrappers(model: torch.nn.Module) -> list:
    """torch.compile(model) wrappers that already exist around `model` (found through the
    garbage collector's referrers: the wrapper holds the model in its `_modules`)."""
    from torch._dynamo.eval_frame import OptimizedModule

    found = []
    for holder in gc.get_referrers(model):
        if isinstance(holder, dict) and holder.get("_orig_mod") is model:
            for owner in gc.get_referrers(holder):
                if isinstance(owner, dict):
                    for o in gc.get_referrers(owner):
                        if isinstance(o, OptimizedModule) and o.__dict__ is owner:
                            found.append(o)
                elif isinstance(owner, OptimizedModule):
                    found.append(owner)
    return list({id(o): o for o in found}.values())


@torch._dynamo.disable
def dmi_step_boundary_runs_outside_compiled_code(fn, *args):
    """Runs eagerly at every call of a compiled forward (a graph break). Under fullgraph=True
    dynamo refuses it by this name: pass the compiled module to dmi.attach, or create it
    before attaching, so dmi can bracket the compiled call from outside."""
    return fn(*args)


def bracket(adapter, compiled):
    """`compiled` with the step begun before it and ended after it, outside compiled code."""

    @functools.wraps(compiled)
    def call(*args, **kwargs):
        adapter.outer_begin(args, kwargs)
        try:
            return compiled(*args, **kwargs)
        finally:
            adapter.outer_end()

    call.__dmi_bracket__ = True
    return call
