"""Row ids of served requests: unique whatever id the client sent.

The front end gives every HTTP request a fresh id (`uid`, 16 hex digits from a CSPRNG) and
sends it to the engine with the request. One HTTP request becomes several engine requests
(one per prompt, and per choice when n > 1; SGLang adds one prefill-only request per prompt
that later choices share through its radix cache), so the engine side stores each engine
request's rows under

    <uid>.<prompt>.<choice>      prompt: index in the request's prompt list (0 for chat);
                                 choice: index in `choices` of the response (0 when n = 1)
    <uid>.<prompt>.prefix        SGLang n > 1: the shared prompt, computed once

Two requests with the same client id (X-Request-Id, SGLang `rid`) get different uids, so
their rows never merge.
"""
from __future__ import annotations

import re
import secrets

PREFIX = "prefix"
_UID = re.compile(r"^[0-9a-f]{16}$")


def new_uid() -> str:
    return secrets.token_hex(8)


def is_uid(s: str) -> bool:
    return bool(_UID.match(s))


def row_name(uid: str, prompt: int, choice: int | str) -> str:
    return f"{uid}.{prompt}.{choice}"


def parse_row_name(name: str) -> tuple[str, int, int | str] | None:
    """(uid, prompt, choice or "prefix") of a served row id; None for any other id."""
    parts = name.split(".")
    if len(parts) != 3 or not is_uid(parts[0]) or not parts[1].isdigit():
        return None
    choice: int | str = int(parts[2]) if parts[2].isdigit() else parts[2]
    if choice != PREFIX and not isinstance(choice, int):
        return None
    return parts[0], int(parts[1]), choice
