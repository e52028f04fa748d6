"""Shared plumbing for the task modules: settings from ctx, error handling, output."""
from __future__ import annotations

import functools
import logging
import os
from typing import Any, Callable

from invoke import Context, Exit, task as invoke_task

from .. import ui
from ..config import Settings, load_settings
from ..errors import KvmlabError


def debug_enabled() -> bool:
    return os.environ.get("KVMLAB_DEBUG", "") not in ("", "0") or \
        logging.getLogger("invoke").isEnabledFor(logging.DEBUG)


def settings(ctx: Context, **overrides: Any) -> Settings:
    """Settings for this run: flags > KVMLAB_* env > invoke config 'kvmlab:' section > defaults."""
    try:
        cfg = ctx.config.get("kvmlab", {}) or {}
        cfg = dict(cfg) if hasattr(cfg, "keys") else {}
    except Exception:  # pragma: no cover - invoke config oddities
        cfg = {}
    return load_settings(overrides, cfg)


def task(*args: Any, **kwargs: Any) -> Callable:
    """invoke's @task plus kvmlab's error handling.

    A KvmlabError becomes one red line + hint and exit status 1 (traceback only with --debug or
    KVMLAB_DEBUG=1); Ctrl-C becomes exit status 130 after the step's own cleanup has run.
    """
    def decorate(fn: Callable) -> Any:
        @functools.wraps(fn)
        def wrapper(ctx: Context, *a: Any, **kw: Any) -> Any:
            try:
                return fn(ctx, *a, **kw)
            except KvmlabError as e:
                if debug_enabled():
                    raise
                ui.error(e.message, e.hint)
                raise Exit(code=e.exit_code) from None
            except KeyboardInterrupt:
                ui.error("interrupted; cleaned up what this step had started")
                raise Exit(code=130) from None
        kwargs.setdefault("auto_shortflags", False)  # keep -h for help
        return invoke_task(*args, **kwargs)(wrapper)

    if len(args) == 1 and callable(args[0]) and not kwargs:
        fn = args[0]
        args = ()
        return decorate(fn)
    return decorate


def run_step_checks(s: Settings, step: str, no_verify: bool = False,
                    extra_env: dict[str, str] | None = None) -> None:
    """Run tests/infra/test_<step>.py against local:// after a step (skipped with --no-verify)."""
    if no_verify:
        return
    from .. import verify as verify_mod
    from ..errors import VerifyError
    report = verify_mod.run_checks(s, [step], ["local://"], extra_env=extra_env)
    if not report.ok:
        verify_mod.print_report(report)
        bad = report.failed()
        raise VerifyError(f"{step}: {len(bad)} check(s) failed after the step: " +
                          ", ".join(r.name for r in bad[:5]),
                          hint="the step's output is not what it should be; see the table above")
    ui.info(f"[green]verified[/green] {step}: {len(report.results)} check(s) passed")
