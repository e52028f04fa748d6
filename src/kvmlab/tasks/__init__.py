"""The invoke task collection, assembled from every module in this package.

Each module kvmlab/tasks/<concern>.py defines its tasks with kvmlab.tasks._common.task; this
file collects them all so `invoke --list` (tasks.py) and the `kvmlab` program show the same set.
"""
from __future__ import annotations

import importlib
import pkgutil

from invoke import Collection, Task

ns = Collection()


def _collect() -> None:
    for mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if mod.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{mod.name}")
        for obj in vars(module).values():
            if isinstance(obj, Task) and obj.__module__ == module.__name__:
                ns.add_task(obj)


_collect()
