"""Policies: which rows are kept (filters), what happens when the drain falls behind (overload),
and the books that account for every row."""
from .accounting import Accounting
from .filters import RowFilter
from .overload import BLOCK_TIMEOUT_S, Overload

__all__ = ["Accounting", "RowFilter", "Overload", "BLOCK_TIMEOUT_S"]
