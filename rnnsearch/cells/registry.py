"""The cell registry: ``register_cell``, ``create_cell``, ``list_cells``.

Built-in cells register when :mod:`rnnsearch.cells` is imported; third-party
packages register through the entry-point group ``rnnsearch.cells`` (the entry
point names a module or a cell class). The registry key equals the config file
name in ``conf/cell/`` and the cell's ``name`` option.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from rnnsearch.errors import check_positive_int
from rnnsearch.registry import Registry, check_options

from .base import RNNCell

def _check_cell_class(obj: Any) -> str | None:
    """Why ``obj`` cannot be a registry cell: it must be an RNNCell class built as ``cls(input_size, hidden_size)``."""
    if not (isinstance(obj, type) and issubclass(obj, RNNCell)):
        return "a cell must be a class derived from rnnsearch.RNNCell (see README, 'Your own cell')."
    try:
        inspect.signature(obj.__init__).bind(None, 1, 1)
    except TypeError:
        return (f"its __init__{inspect.signature(obj.__init__)} must take (input_size, hidden_size) positionally, "
                f"with every other argument optional (a config sets them by name).")
    return None


CELLS: Registry[type[RNNCell]] = Registry("cell", entry_point_group="rnnsearch.cells", check=_check_cell_class)

C = TypeVar("C", bound=type[RNNCell])


def register_cell(name: str, *, replace: bool = False) -> Callable[[C], C]:
    """Class decorator: make the cell available as ``create_cell(name, ...)`` and ``cell=name``.

    Example:
        >>> @register_cell("mycell")
        ... class MyCell(RNNCell):
        ...     def __init__(self, input_size, hidden_size):
        ...         super().__init__(input_size, hidden_size)
        ...         self.lin = torch.nn.Linear(input_size + hidden_size, hidden_size)
        ...     def forward(self, x_t, state):
        ...         h = torch.tanh(self.lin(torch.cat([x_t, state[0]], 1)))
        ...         return h, (h,)
    """
    return CELLS.register(name, replace=replace)  # type: ignore[return-value]


def list_cells(pattern: str = "*") -> list[str]:
    """Registered cell names matching the fnmatch ``pattern``, sorted."""
    return CELLS.names(pattern)


def get_cell_class(name: str) -> type[RNNCell]:
    """The class registered as ``name``."""
    return CELLS.get(name)


def create_cell(name: str, input_size: int, hidden_size: int, **options: Any) -> RNNCell:
    """Build the cell registered as ``name``; options it does not take are an error listing the valid ones."""
    cls = CELLS.get(name)
    check_positive_int(f"input_size of cell {name!r}", input_size)
    check_positive_int(f"hidden_size of cell {name!r}", hidden_size)
    check_options("cell", name, cls.__init__, options, skip=("self", "input_size", "hidden_size"))
    return cls(input_size, hidden_size, **options)
