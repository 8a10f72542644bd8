"""The built-in HDF5 sink passes the same sink conformance kit third-party sinks run."""
from dmi.sinks.hdf5 import HDF5Sink
from dmi.testing import hdf5_read_back, run_sink_conformance


def test_hdf5_sink_conformance(tmp_path):
    run_sink_conformance(lambda d: HDF5Sink(str(d / "c.h5"), chunk_bytes=512),
                         lambda d: hdf5_read_back(d / "c.h5"), tmp_path)
