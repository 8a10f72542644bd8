"""matrix_bench: capture overhead across engines x batch sizes x decode lengths x modes.

Run as `python -m matrix_bench`. Modes are interleaved inside each repeat so machine noise hits
all alike; overhead is a ratio to `off` from the same run. Results go to one HDF5 file.
"""
