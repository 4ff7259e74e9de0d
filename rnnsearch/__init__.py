"""rnnsearch: compose recurrent models from config, search over them with Optuna, track with MLflow.

Public API: :class:`RNNCell`, :func:`register_cell`, :func:`create_cell`,
:func:`list_cells`, :func:`build_model`, :func:`train`, :func:`register_task`,
:func:`create_task`, :func:`list_tasks`.
"""

from rnnsearch.cells import RNNCell, create_cell, create_wrapper, list_cells, list_wrappers, register_cell, register_wrapper
from rnnsearch.errors import ConfigError
from rnnsearch.model import build_model, count_parameters
from rnnsearch.tasks import Task, create_task, list_tasks, register_task
from rnnsearch.train import train

__all__ = [
    "RNNCell", "register_cell", "create_cell", "list_cells", "create_wrapper", "list_wrappers", "register_wrapper",
    "ConfigError", "build_model", "count_parameters", "Task", "create_task", "list_tasks", "register_task", "train",
]
__version__ = "0.1.0"
