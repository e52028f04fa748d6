"""The `kvmlab` console command: the same task collection as `invoke`, configured by
kvmlab.yaml files and KVMLAB_* environment variables."""
from __future__ import annotations

from invoke import Config, Program

from kvmlab import __version__
from kvmlab.tasks import ns


class KvmlabConfig(Config):
    prefix = "kvmlab"
    env_prefix: str | None = "KVMLAB"  # type: ignore[assignment]  # invoke declares it None


program = Program(name="kvmlab", binary="kvmlab", version=__version__, namespace=ns,
                  config_class=KvmlabConfig)


def main() -> None:  # pragma: no cover - entry point
    program.run()
