"""A served request's `interventions`: checked in the front end, applied by the engine's banks
(dmi/interventions/banks.py), reported back from the run's books.

    "interventions": [{"hook": "blocks.1.hook_resid_post", "op": "add", "value": [...],
                       "scale": 2.0, "tokens": "decode" | {"positions": [[4, 9]]}},
                      {"hook": ..., "op": "scale", "scale": 0.5},
                      {"hook": ..., "op": "set", "value": [...]},
                      {"hook": ..., "op": "zero", "heads": [1, 3]}]

Values are inline numbers only (a server never reads a client-named file or run; `patch`
and `project_out` are not served). A request's edits of one hook compose in order and share
one `tokens` filter (one affine per row on the engine). Anything else: RequestError naming
the field, e.g. `dmi.interventions[0].value`.
"""
from __future__ import annotations

import math

import pydantic

from dmi.interventions.banks import OPS

FIELDS = ("hook", "op", "value", "scale", "heads", "tokens")
MAX = 64


def check(ivs, served) -> list[dict] | None:
    """The interventions as the engine receives them; served: dmi.serve.hooks.Served."""
    from dmi.spec import TokenFilter

    from .request import RequestError

    if not ivs:
        return None
    if len(ivs) > MAX:
        raise RequestError("dmi.interventions", f"{len(ivs)} interventions; at most {MAX} per request")
    out, tokens_of = [], {}
    for k, iv in enumerate(ivs):
        f = f"dmi.interventions[{k}]"
        if not isinstance(iv, dict):
            raise RequestError(f, f"expected an object with fields {', '.join(FIELDS)}")
        extra = sorted(set(iv) - set(FIELDS))
        if extra:
            raise RequestError(f"{f}.{extra[0]}", f"unknown field; valid fields: {', '.join(FIELDS)} (a server "
                                                  f"applies a request's interventions to that request only)")
        op = iv.get("op")
        if op not in OPS:
            raise RequestError(f"{f}.op", f"{op!r}; valid: {', '.join(OPS)} (project_out and patch are not served)")
        hook = iv.get("hook")
        if hook not in served.steerable:
            offered = ", ".join(served.steerable) or "none"
            raise RequestError(f"{f}.hook", f"{hook!r} is not a hook this server lets clients steer; steerable: "
                                            f"{offered}")
        shape = tuple(served.shapes[hook])
        numel = math.prod(shape)
        value, scale, heads = iv.get("value"), iv.get("scale"), iv.get("heads")
        if op in ("add", "set"):
            if not isinstance(value, list) or not all(_number(x) for x in value):
                raise RequestError(f"{f}.value", f"op {op!r} needs a value: a flat list of {numel} finite numbers "
                                                 f"(files and stored runs are not read on a server)")
            if len(value) != numel:
                raise RequestError(f"{f}.value", f"{len(value)} numbers; {hook} rows hold {numel} {list(shape)}")
        elif value is not None:
            raise RequestError(f"{f}.value", f"op {op!r} takes no value (ops that take one: add, set)")
        if op == "scale" and scale is None:
            raise RequestError(f"{f}.scale", "op 'scale' needs 'scale', the factor")
        if scale is not None:
            if op not in ("add", "scale"):
                raise RequestError(f"{f}.scale", f"'scale' applies to ops 'add' and 'scale', not {op!r}")
            if not _number(scale):
                raise RequestError(f"{f}.scale", f"{scale!r} is not a finite number")
        if heads is not None:
            if op != "zero":
                raise RequestError(f"{f}.heads", f"'heads' applies to op 'zero', not {op!r}")
            if len(shape) != 2:
                raise RequestError(f"{f}.heads", f"{hook} rows are {list(shape)}, with no heads dimension")
            if (not isinstance(heads, list) or not heads
                    or not all(isinstance(h, int) and not isinstance(h, bool) and 0 <= h < shape[0] for h in heads)):
                raise RequestError(f"{f}.heads", f"a non-empty list of head indices in 0..{shape[0] - 1}")
        tokens = iv.get("tokens")
        if tokens is not None:
            try:
                tokens = TokenFilter.model_validate({"mode": tokens} if isinstance(tokens, str) else tokens)
            except pydantic.ValidationError as e:
                err = e.errors()[0]
                sub = ".".join(str(x) for x in err["loc"] if isinstance(x, str) and x.isidentifier())
                raise RequestError(f"{f}.tokens" + (f".{sub}" if sub else ""),
                                   err["msg"].removeprefix("Value error, ")) from None
            tokens = tokens.model_dump()
        if tokens_of.setdefault(hook, tokens) != tokens:
            raise RequestError(f"{f}.tokens", f"a request's interventions on {hook} must share one 'tokens' (they "
                                              f"compose into one edit per row)")
        out.append({"hook": hook, "op": op, "value": [float(x) for x in value] if value is not None else None,
                    "scale": float(scale) if scale is not None else None, "heads": heads, "tokens": tokens})
    return out


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def report(books: dict, uid: str, ivs: list[dict]) -> list[dict]:
    """What the engine applied of each of a request's interventions, from the run's books
    (dmi.Run.interventions): per part (prompt, choice), the positions edited, and those not
    edited with why. A steered request's prefix cache is its own (its cache_salt), so prompt
    positions a choice took from the cache were computed, with the same edits, by a sibling
    of the same prompt: where the books show that sibling edited them, they are reported as
    `shared_prompt_positions` of that part, not as missed."""
    out = []
    for k, iv in enumerate(ivs):
        entry = books.get(f"served@{iv['hook']}")
        item = {"index": k, "hook": iv["hook"], "op": iv["op"], "rows": 0, "parts": [], "not_applied": []}
        if entry is None:
            item.update(applied=False, why="the engine holds no bank for this hook (its session did not arm; "
                                           "see the server's log)")
            out.append(item)
            continue
        done: dict[int, set[int]] = {}  # prompt -> positions some part of it edited
        for (p, c), ranges in _mine(entry.get("requests", {}), uid):
            item["rows"] += sum(b - a for a, b in ranges)
            item["parts"].append({"prompt": p, "choice": c, "positions": ranges})
            done.setdefault(p, set()).update(x for a, b in ranges for x in range(a, b))
        for why, by in entry.get("failed", {}).items():
            for (p, c), ranges in _mine(by, uid):
                pos = [x for a, b in ranges for x in range(a, b)]
                shared = [x for x in pos if why == "prefix_cache" and x in done.get(p, ())]
                missed = [x for x in pos if x not in set(shared)]
                if shared:
                    part = next((q for q in item["parts"] if (q["prompt"], q["choice"]) == (p, c)), None)
                    if part is None:
                        part = {"prompt": p, "choice": c, "positions": []}
                        item["parts"].append(part)
                    part["shared_prompt_positions"] = _ranges(shared)
                if missed:
                    item["not_applied"].append({"reason": why, "prompt": p, "choice": c, "positions": _ranges(missed)})
        item["applied"] = bool(item["parts"]) and not item["not_applied"]
        if not item["parts"] and not item["not_applied"]:
            item["why"] = "no row of this request matched its tokens"
        out.append(item)
    return out


def _mine(by_name: dict, uid: str):
    from .names import PREFIX, parse_row_name

    got = []
    for name, ranges in by_name.items():
        part = parse_row_name(name)
        if part is not None and part[0] == uid:
            got.append(((part[1], part[2]), ranges))
    got.sort(key=lambda x: (x[0][0], x[0][1] == PREFIX, x[0][1] if isinstance(x[0][1], int) else 0))
    return got


def _ranges(pos: list[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for x in sorted(pos):
        if out and out[-1][1] == x:
            out[-1][1] = x + 1
        else:
            out.append([x, x + 1])
    return out
