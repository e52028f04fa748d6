"""The `kvmlab` console command: the same task collection as `invoke`, configured by
kvmlab.yaml files and KVMLAB_* environment variables.

invoke reads the project file (invoke.yaml) beside the tasks.py it loaded; this program has no
tasks.py to find, so its project file is ./kvmlab.yaml (.yml, .json, .py) in the current
directory, read with the same precedence (below -f FILE, the environment and flags).
"""
from __future__ import annotations

import os
from typing import Any

from invoke import Config, Program

from kvmlab import __version__
from kvmlab.tasks import ns


class KvmlabConfig(Config):
    prefix = "kvmlab"
    env_prefix: str | None = "KVMLAB"  # type: ignore[assignment]  # invoke declares it None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("project_location") is None:
            kwargs["project_location"] = os.getcwd()
        super().__init__(*args, **kwargs)
        if not kwargs.get("lazy"):
            self.load_project()


program = Program(name="kvmlab", binary="kvmlab", version=__version__, namespace=ns,
                  config_class=KvmlabConfig)


def main() -> None:  # pragma: no cover - entry point
    program.run()
