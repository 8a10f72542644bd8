"""The reading API every run shares, whatever holds the rows (HDF5 file, memory, dataset):
TransformerLens-style `run[hook]`, a padded batch view `stack`, and integer request ids.

A subclass provides `requests`, `hooks`, `get(hook, request)` and `positions(hook, request)`;
everything here is built on those, so the views equal the per-request reads by construction.
"""
from __future__ import annotations


from typing import Any

import torch


class UnknownName(KeyError):
    """A hook or request the run does not have, or an index it cannot take: the caller's
    mistake, never reported as file damage."""


class RunViews:
    @property
    def interventions(self) -> dict[str, Any]:
        """The interventions' books: for each, which (request, [start, stop) position ranges) it
        applied to ("requests"), and rows it could not apply to ("failed", by reason)."""
        books = self.stats.get("interventions")
        return books if isinstance(books, dict) else {}

    # -- request ids ------------------------------------------------------------------------

    def request_id(self, request: Any) -> str:
        """The string id a caller means. An int n means the request whose id is the number n
        ("1" for 1), if exactly one id is that number; else a KeyError says why."""
        if isinstance(request, str):
            return request
        if isinstance(request, bool) or not isinstance(request, int):
            try:
                import numpy as np

                if isinstance(request, np.integer):
                    return self.request_id(int(request))
            except ImportError:  # pragma: no cover
                pass
            raise TypeError(f"request must be a str id or an int, got {type(request).__name__} {request!r}")
        matches = [r for r in self.requests if _as_int(r) == request]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            shown = ", ".join(repr(r) for r in self.requests[:5]) + (", ..." if len(self.requests) > 5 else "")
            raise UnknownName(f"no request has the id {request}; this run's ids are strings ({shown}); "
                           f"pass one of them, or run.requests[{request}] for the request at that index")
        raise UnknownName(f"request {request} is ambiguous: ids {matches} all read as the number {request}; "
                       f"pass the string id")

    def _gap_query(self, hook: str | None, request: Any, gap_hooks) -> str | None:
        """Check a gaps() query and return its request id (None: all). A hook is known when the
        run holds rows of it or a gap names it (every row of it dropped)."""
        from dmi.reader.run import _unknown, natural_key

        if hook is not None and hook not in self.hooks and hook not in gap_hooks:
            raise _unknown("hook", hook, sorted(set(self.hooks) | set(gap_hooks), key=natural_key))
        if request is None:
            return None
        rid = self.request_id(request)
        if rid not in self.requests:
            raise _unknown("request", rid, self.requests)
        return rid

    # -- TransformerLens-style access ---------------------------------------------------------

    def __getitem__(self, key: Any) -> torch.Tensor:
        """run[hook] is the rows of the run's only request ([pos, *row]); run[hook, request] the
        rows of that request. A run with several requests refuses run[hook]: use run[hook,
        request] or run.stack(hook)."""
        if isinstance(key, tuple):
            if len(key) != 2:
                raise UnknownName(f"index with run[hook] or run[hook, request], not a {len(key)}-tuple")
            return self.get(key[0], key[1])
        requests = self.requests
        if len(requests) != 1:
            raise UnknownName(f"run[{key!r}] needs a run with exactly one request, this one has {len(requests)}; "
                           f"use run[{key!r}, request] for one of them or run.stack({key!r}) for all")
        return self.get(key, requests[0])

    def __contains__(self, hook: object) -> bool:
        return hook in self.hooks

    def keys(self) -> list[str]:
        return self.hooks

    # -- batched view ---------------------------------------------------------------------------

    def stack(self, hook: str, requests: list | None = None, device: str | torch.device | None = None,
              align: str = "position") -> tuple[torch.Tensor, torch.Tensor]:
        """All (or the given) requests' rows of `hook` as one padded batch.

        Returns (values [n, max_pos, *row], mask [n, max_pos] bool). With align="position" (the
        default) values[i, p] is request i's row at token position p, so positions line up
        across requests like TransformerLens's [batch, pos, ...]; max_pos is the highest position
        captured + 1 and mask marks the positions captured. With align="row" the rows are packed
        from index 0 in position order (for filters that keep sparse positions). Padding is 0.
        Ragged rows (attention pattern) are zero-padded to the widest.
        """
        if align not in ("position", "row"):
            raise ValueError(f"align must be 'position' or 'row', got {align!r}")
        ids = self.requests if requests is None else [self.request_id(r) for r in requests]
        rows = [self.get(hook, r) for r in ids]
        slots = [self.positions(hook, r) if align == "position" else torch.arange(len(x)) for x, r in zip(rows, ids)]
        length = max((int(s.max()) + 1 for s in slots if len(s)), default=0)
        if rows:
            row_shape = tuple(max(x.shape[d] for x in rows) for d in range(1, rows[0].dim()))
            dtype = rows[0].dtype
        else:
            row_shape, dtype = (), torch.float32
        values = torch.zeros((len(ids), length, *row_shape), dtype=dtype, device=device)
        mask = torch.zeros((len(ids), length), dtype=torch.bool, device=device)
        for i, (x, s) in enumerate(zip(rows, slots)):
            if not len(s):
                continue
            idx = s.to(device=values.device, dtype=torch.long)
            dst = values[i]
            if tuple(x.shape[1:]) != row_shape:   # ragged: narrower rows go in the leading corner
                dst = dst[(slice(None), *(slice(0, d) for d in x.shape[1:]))]
            dst[idx] = x.to(values.device)
            mask[i, idx] = True
        return values, mask


def _as_int(s: str) -> int | None:
    try:
        return int(s) if s.strip() == s and s.lstrip("+-").isdigit() else None
    except ValueError:
        return None
