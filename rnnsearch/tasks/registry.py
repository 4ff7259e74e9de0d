"""The task registry: ``register_task``, ``create_task``, ``list_tasks``.

Built-in tasks register when :mod:`rnnsearch.tasks` is imported; other
packages add theirs through the entry-point group ``rnnsearch.tasks``. The key
equals the config file name in ``conf/task/`` and the config's ``name``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from omegaconf import OmegaConf

from rnnsearch.errors import ConfigError
from rnnsearch.registry import Registry, accepted_options, check_options

from .base import Task

TASKS: Registry[type[Task]] = Registry("task", entry_point_group="rnnsearch.tasks")

T = TypeVar("T", bound=type[Task])


def register_task(name: str, *, replace: bool = False) -> Callable[[T], T]:
    """Class decorator: make the task available as ``task=name``."""
    return TASKS.register(name, replace=replace)  # type: ignore[return-value]


def list_tasks(pattern: str = "*") -> list[str]:
    """Registered task names matching the fnmatch ``pattern``."""
    return TASKS.names(pattern)


def create_task(cfg: Mapping[str, Any] | str, **options: Any) -> Task:
    """Build a task from its config (``{name: adding, seq_len: 100, ...}``) or a name plus options."""
    if isinstance(cfg, str):
        name, opts = cfg, dict(options)
    else:
        opts = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
        opts.update(options)
        if "name" not in opts:
            raise ConfigError("The task config has no 'name' (e.g. task=adding).")
        name = opts.pop("name")
    cls = TASKS.get(name)
    if "permute" in opts and not _takes(cls, "permute"):
        pixel_tasks = [n for n in list_tasks() if _takes(TASKS.get(n), "permute")]
        raise ConfigError(f"task.permute={opts['permute']!r}: the task {name!r} has no pixels to permute. The fixed "
                          f"pixel permutation (the pMNIST protocol) exists for {', '.join(pixel_tasks) or 'no task'}; "
                          f"drop task.permute or use task=digits.")
    check_options("task", name, cls.__init__, opts, skip=("self",))
    return cls(**opts)


def _takes(cls: type[Task], option: str) -> bool:
    valid = accepted_options(cls.__init__, skip=("self",))
    return valid is None or option in valid
