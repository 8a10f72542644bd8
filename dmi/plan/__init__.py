"""The plan: before each forward, one plan for the whole step (rows, filters, overload, ring
reservation, the control table the capture op reads)."""
from .rows import DECODE, LOGITS, PREFILL, TOKENS, RowTable
from .step import Frame, HookRows, Planner

__all__ = ["RowTable", "PREFILL", "DECODE", "TOKENS", "LOGITS", "Frame", "HookRows", "Planner"]
