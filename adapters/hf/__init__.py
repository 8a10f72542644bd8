"""HF transformers adapter (the only code that touches an HF model's internals)."""
from .adapter import HFAdapter
from .tables import BUILTIN_TABLES

__all__ = ["HFAdapter", "BUILTIN_TABLES"]
