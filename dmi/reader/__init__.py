"""Read captured runs: `open_run(path)` returns a `Run` (exposed as `dmi.open`)."""
from dmi.reader.ranks import ShardedRun
from dmi.reader.run import Run, open_run

__all__ = ["Run", "ShardedRun", "open_run"]
