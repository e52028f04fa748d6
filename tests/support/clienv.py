"""The environment of a CLI run in a test: kvmlab's settings all under a temporary directory."""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def isolated_env(tmp: Path, **extra: str) -> dict[str, str]:
    """os.environ without KVMLAB_* and colour switches; state, cache and lock under ``tmp``;
    recipes and patches from the checkout; ``extra`` on top."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("KVMLAB_") and k not in ("NO_COLOR", "FORCE_COLOR")}
    env.update(KVMLAB_HOME=str(REPO), KVMLAB_STATE_DIR=str(tmp / "state"),
               KVMLAB_CACHE=str(tmp / "cache"), KVMLAB_LOCK=str(tmp / "state" / "kvmlab.lock"),
               PYTHONPATH=str(REPO / "src"))
    env.update(extra)
    (tmp / "state").mkdir(exist_ok=True)
    return env
