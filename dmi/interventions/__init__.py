"""Interventions: per-request edits of activations at capture points (spec field `interventions`).

spec.py states what may be written; values.py loads the vectors and stored rows; edits.py turns
the spec into edit points at attach (everything validated there) and, once per step, into the
edit table the in-graph op (dmi.kernels.edit_op) reads; books.py records which rows each
intervention applied to; banks.py holds served requests' own interventions (one value bank per
hook the operator lets clients steer, a slot per steering request).
"""
