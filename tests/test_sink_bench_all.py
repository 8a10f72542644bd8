"""matrix_bench.sink_bench_all measures every sink through the Sink interface."""
from __future__ import annotations

import re

import pytest

pytest.importorskip("pyarrow")


def test_every_sink_measured(capsys):
    from matrix_bench.sink_bench_all import main

    assert main(["--mb", "0.5", "--repeats", "1", "--widths", "64", "--intervals", "inf,0.5", "--hooks", "2"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()[2:]]
    cells = {(r[0].strip(), r[2].strip()): float(r[3]) for r in rows}
    assert set(cells) == {("hdf5", "inf"), ("dataset", "inf"), ("dataset-bytes", "inf"), ("dataset-safetensors", "inf"),
                          ("memory", "inf"), ("hdf5", "0.5"), ("dataset", "0.5"), ("dataset-bytes", "0.5"),
                          ("dataset-safetensors", "0.5")}
    assert all(v > 0 for v in cells.values())
    assert all(re.fullmatch(r"\d+%", r[4].strip()) for r in rows)


def test_unknown_sink_is_refused(capsys):
    from matrix_bench.sink_bench_all import main

    with pytest.raises(SystemExit) as e:
        main(["--sinks", "hdf5,parquet"])
    assert e.value.code == 2 and "unknown sink 'parquet'" in capsys.readouterr().err
