from __future__ import annotations


def inspect_file(path: str) -> str:
    from dmi.reader import open_run
    from dmi.reader.summary import summarize

    with open_run(path) as run:
        return summarize(run)
