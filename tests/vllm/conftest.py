"""Real vLLM engines on CPU, on the tiny models of tests/conftest.py. Engines are slow to
start (4 s in-process, ~25 s multiprocess, a minute compiled): one per test module."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
