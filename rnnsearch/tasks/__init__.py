"""Benchmark sequence tasks: the contract, the registry and the built-in tasks."""

from .base import SPLITS, Batch, Task
from .registry import TASKS, create_task, list_tasks, register_task
from . import adding, arithmetic, chorales, copy, digits, tagging  # noqa: E402,F401  (registration side effect)

__all__ = ["SPLITS", "Batch", "Task", "TASKS", "create_task", "list_tasks", "register_task"]
