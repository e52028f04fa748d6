"""Shared plumbing for the task modules: settings from ctx, error handling, output."""
from __future__ import annotations

import errno
import functools
import inspect
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from invoke import Config, Context, Exit, Task
from invoke import task as invoke_task
from invoke.exceptions import ParseError
from invoke.parser import Argument, Parser

from kvmlab.core import proc, ui
from kvmlab.core.errors import ConfigError, KvmlabError, VerifyError
from kvmlab.core.settings import Settings, env_name, load_settings, resolve_settings
from kvmlab.lab import steps as lab_steps
from kvmlab.lab import verify as verify_mod
from kvmlab.model.recipe import load_recipe
from kvmlab.tasks import _flags


def _checked_runtime_config() -> None:
    """Make invoke's `-f FILE` fail clearly: a missing file is an error (invoke ignores it), and
    a malformed one is one error line instead of a YAML/JSON traceback.

    invoke loads the runtime file after this package is imported and offers no hook for it, so
    its Config loader is wrapped here (only for prefix "runtime"; other config files unchanged).
    """
    if getattr(Config._load_file, "_kvmlab_checked", False):
        return
    original = Config._load_file

    def load_file(self: Config, prefix: str, absolute: bool = False, merge: bool = True) -> None:
        if prefix != "runtime":
            return original(self, prefix, absolute, merge)
        try:
            return _load_runtime(self, original, absolute, merge)
        except ParseError as e:
            _flags.json_refusal(e)   # under --json: the same error as one JSON document
            raise

    load_file._kvmlab_checked = True  # type: ignore[attr-defined]
    Config._load_file = load_file  # type: ignore[method-assign]


def _load_runtime(config: Config, original: Callable, absolute: bool, merge: bool) -> None:
    path = getattr(config, "_runtime_path", None)
    if path and not os.path.isfile(os.path.expanduser(path)):
        raise ParseError(f"error: config file {path}: no such file\n"
                         "hint: check the path given to -f/--config")
    try:
        return original(config, "runtime", absolute, merge)
    except ParseError:
        raise
    except Exception as e:  # yaml/json/py errors and invoke's UnknownFileType
        first = " ".join(str(e).split())[:200]
        raise ParseError(f"error: config file {path} cannot be read: {first}\n"
                         "hint: fix the file (YAML, JSON or Python with a kvmlab: "
                         "section), or leave out -f") from None


def _json_parse_errors() -> None:
    """invoke's own refusals of a command line (an unknown flag or task, a flag without its
    value) are one JSON document under --json too (kvmlab.tasks._flags.json_refusal)."""
    if getattr(Parser.parse_argv, "_kvmlab_checked", False):
        return
    original = Parser.parse_argv

    def parse_argv(self: Parser, argv: list[str]) -> Any:
        try:
            return original(self, argv)
        except ParseError as e:
            _flags.json_refusal(e)
            raise

    parse_argv._kvmlab_checked = True  # type: ignore[attr-defined]
    Parser.parse_argv = parse_argv  # type: ignore[method-assign]


_checked_runtime_config()
_json_parse_errors()


class KvmlabTask(Task):
    """A task whose typed flags parse through kvmlab.tasks._flags, with --debug on every task."""

    def arg_opts(self, name: str, default: Any, taken_names: set[str]) -> dict[str, Any]:
        opts = super().arg_opts(name, default, taken_names)
        ftype = _flags.flag_type(self.name.replace("_", "-"), name)
        shown = "" if isinstance(default, bool) or not default or \
            default is inspect.Parameter.empty else f"default {default}"
        if ftype is not None:
            opts["kind"] = ftype.kind(name.replace("_", "-").rstrip("-"))
            what = f"{ftype.metavar}: {ftype.describe}" + (f"; {shown}" if shown else "")
            opts["help"] = (opts.get("help") or "") + f" ({what})"
        elif shown:
            opts["help"] = (opts.get("help") or "") + f" ({shown})"
        return opts

    def get_arguments(self, ignore_unknown_help: bool | None = None) -> list[Argument]:
        args = super().get_arguments(ignore_unknown_help)
        if not any(a.name == "debug" for a in args):
            # invoke's own --debug counts only before the task name; this one works after it
            args.append(Argument(names=("debug",), kind=bool, default=False,
                                 help="show tracebacks and the commands run (KVMLAB_DEBUG=1)"))
        if not any(a.name == "no-color" for a in args):
            args.append(Argument(names=("no-color",), attr_name="no_color", kind=bool,
                                 default=False, help="no colour in the output (also NO_COLOR=1)"))
        return args


def debug_enabled() -> bool:
    """KVMLAB_DEBUG (proc's rule: also set by --debug after the task name) or invoke's --debug."""
    return proc.debug_enabled() or logging.getLogger("invoke").isEnabledFor(logging.DEBUG)


def _config_section(ctx: Context) -> dict[str, Any]:
    try:
        cfg = ctx.config.get("kvmlab", {}) or {}
        return dict(cfg) if hasattr(cfg, "keys") else {}
    except Exception:  # pragma: no cover - invoke config oddities
        return {}


def settings(ctx: Context, **overrides: Any) -> Settings:
    """Settings for this run: flags > KVMLAB_* env > invoke config 'kvmlab:' section > defaults."""
    return settings_with_sources(ctx, **overrides)[0]


def settings_with_sources(ctx: Context, **overrides: Any) -> tuple[Settings, dict[str, str]]:
    """The settings and where each value came from (flag, env, config, default)."""
    s, sources = resolve_settings(overrides, _config_section(ctx))
    if overrides.get("recipe") or overrides.get("builder"):
        # a recipe or builder named on the command line is checked before anything runs
        r = load_recipe(s.recipes_dir, s.recipe)
        if overrides.get("builder"):
            r.builder(s.builder)
    return s, sources


def task(*args: Any, **kwargs: Any) -> Callable:
    """invoke's @task plus kvmlab's error handling.

    A KvmlabError becomes one red line + hint and exit status 1 (traceback only with --debug or
    KVMLAB_DEBUG=1); under --json it is one JSON document on stdout instead,
    ``{..., "error": ..., "hint": ...}`` (with the report the task attached to the error), and
    every human line goes to stderr. Ctrl-C becomes exit status 130 after the step's own cleanup
    has run. invoke's core ``--dry`` means the task's own --dry-run where it has one; a task
    without one refuses it before doing anything.
    """
    def decorate(fn: Callable) -> Any:
        params = inspect.signature(fn).parameters

        @functools.wraps(fn)
        def wrapper(ctx: Context, *a: Any, debug: bool = False, no_color: bool = False,
                    **kw: Any) -> Any:
            if debug:
                os.environ["KVMLAB_DEBUG"] = "1"  # also reaches the checks' subprocess
            as_json = bool(kw.get("json_"))
            ui.set_color(not (no_color or os.environ.get("NO_COLOR")))
            if as_json:
                ui.json_mode()
            try:
                _invoke_dry(ctx, fn.__name__, params, kw)
                return fn(ctx, *a, **kw)
            except KvmlabError as e:
                if debug_enabled():
                    raise
                _fail(as_json, e.message, e.hint, e.report)
                raise Exit(code=e.exit_code) from None
            except OSError as e:
                if debug_enabled():
                    raise
                message, hint = describe_os_error(e)
                _fail(as_json, message, hint)
                raise Exit(code=1) from None
            except KeyboardInterrupt:
                _fail(as_json, "interrupted; cleaned up what this step had started", None)
                raise Exit(code=130) from None
        kwargs.setdefault("auto_shortflags", False)  # keep -h for help
        kwargs.setdefault("klass", KvmlabTask)
        helps = kwargs.setdefault("help", {})
        if "json_" in params and "json" not in helps and "json_" not in helps:
            helps["json_"] = "print one JSON document on stdout (errors too: " \
                             "{\"error\": ..., \"hint\": ...})"
        return invoke_task(*args, **kwargs)(wrapper)

    if len(args) == 1 and callable(args[0]) and not kwargs:
        fn = args[0]
        args = ()
        return decorate(fn)
    return decorate


def _fail(as_json: bool, message: str, hint: str | None,
          report: dict[str, Any] | None = None) -> None:
    if as_json:
        ui.emit_json({**(report or {}), "error": message, "hint": hint})
    else:
        ui.error(message, hint)


def _invoke_dry(ctx: Context, name: str, params: Any, kw: dict[str, Any]) -> None:
    """invoke's ``--dry`` (echo commands, run none) has nothing to act on in kvmlab, which runs
    no shell commands through ctx.run: it turns into the task's --dry-run, or is refused."""
    try:
        dry = bool(ctx.config.run.dry)
    except (AttributeError, KeyError):
        dry = False
    if not dry:
        return
    if "dry_run" in params:
        kw["dry_run"] = True
        return
    raise ConfigError(f"--dry: `{name.replace('_', '-')}` has no dry run; nothing was done",
                      hint="leave out --dry; install, install-bios, patch and boot-test take "
                           "--dry-run")


# the settings whose paths kvmlab writes to, in the order an error is blamed on them
_WRITTEN_SETTINGS = ("state_dir", "cache", "lock")


def describe_os_error(e: OSError, s: Settings | None = None) -> tuple[str, str]:
    """One line for an OSError a user can cause (read-only state dir, a file where a directory
    should be, ...) and a hint naming the setting that points there."""
    what = e.filename or "a file"
    verb = "read" if isinstance(e, (FileNotFoundError, IsADirectoryError)) else "write"
    reason = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
              errno.EPERM: "operation not permitted", errno.ENOSPC: "no space left on device",
              errno.ENOTDIR: "a part of the path is a file, not a directory",
              errno.EISDIR: "it is a directory", errno.ENOENT: "no such file or directory",
              errno.EEXIST: "it already exists"}.get(e.errno or 0, e.strerror or str(e))
    hint = "check the path and its permissions"
    try:
        s = s or load_settings()
    except KvmlabError:
        s = None
    if s is not None and e.filename:
        target = Path(str(e.filename)).absolute()
        for attr in _WRITTEN_SETTINGS:
            env = env_name(attr)
            base = Path(getattr(s, attr))
            # the lock is written through a temp file beside it (.NAME.*.tmp)
            beside = attr == "lock" and target.parent == base.parent and base.name in target.name
            if target == base or base in target.parents or beside:
                hint = f"{attr} is {base}: set {env} to a writable directory"
                if attr == "lock":
                    hint = f"the lock file is {base}: set {env} to a writable file path"
                break
    return f"cannot {verb} {what}: {reason}", hint


def run_step_checks(s: Settings, step: str, no_verify: bool = False,
                    extra_env: dict[str, str] | None = None) -> dict[str, Any] | None:
    """Run the checks that verify ``step`` (a task name: the registry kvmlab.lab.steps says which
    kvmlab/checks/test_<check>.py) against local:// after it; skipped with --no-verify.

    Prints one line with passed / failed / skipped counted apart and returns them
    (``VerifyReport.counts``) for the task's --json document; None with --no-verify."""
    if no_verify:
        return None
    check = lab_steps.check_of(step)
    report = verify_mod.run_checks(s, [check], ["local://"], extra_env=extra_env)
    counts = {"check": check, **report.counts()}
    if not report.ok:
        verify_mod.print_report(report)
        bad = report.failed()
        raise VerifyError(f"{check}: {len(bad)} check(s) failed after the step: " +
                          ", ".join(r.name for r in bad[:5]) + f" ({counts['summary']})",
                          hint="the step's output is not what it should be; see the table above"
                          ).with_report({"verify": counts})
    if counts["passed"]:
        ui.info(f"[green]verified[/green] {check}: {counts['summary']}")
    else:
        ui.warn(f"not verified: {check}: {counts['summary']}")
    return counts


def dry_run_end(what: str = "nothing was written") -> None:
    """The one line every --dry-run ends with, after the task showed what it would do."""
    ui.info(f"dry run: {what}")
