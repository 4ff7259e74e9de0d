"""Recurrent cells: the base class, the registry, the built-in cells and the wrappers.

Importing this package registers the built-in cells (``rnn``, ``lstm``,
``gru``, ``ln_lstm``) and wrappers (``dropout``, ``residual``, ``device``,
``zoneout``).
"""

from .base import RNNCell, State
from .registry import CELLS, create_cell, get_cell_class, list_cells, register_cell
from . import rnn, lstm, gru, ln_lstm  # noqa: E402,F401  (registration side effect)
from .wrappers import WRAPPERS, CellWrapper, create_wrapper, list_wrappers, register_wrapper

__all__ = [
    "RNNCell", "State", "CELLS", "create_cell", "get_cell_class", "list_cells", "register_cell",
    "WRAPPERS", "CellWrapper", "create_wrapper", "list_wrappers", "register_wrapper",
]
