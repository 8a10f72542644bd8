"""Engine adapters. Each subpackage is the only code that touches its engine's internals."""
