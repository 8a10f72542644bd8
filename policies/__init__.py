"""Policies: which rows are kept (filters) and the books on every row (accounting)."""
from .accounting import Accounting
from .filters import RowFilter

__all__ = ["RowFilter", "Accounting"]
