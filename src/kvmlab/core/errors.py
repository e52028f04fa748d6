"""One exception hierarchy for every error a user can cause.

Each error carries a one-line ``message`` (what happened) and an optional ``hint`` (what to do).
The task layer (kvmlab.tasks) turns them into one red line plus the hint and a non-zero exit;
tracebacks are shown only with ``--debug`` / ``KVMLAB_DEBUG=1``.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class KvmlabError(Exception):
    """Base class: a user-facing error with an optional hint."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.report: dict[str, Any] = {}   # what the task found, shown with it under --json

    def with_report(self, report: Mapping[str, Any]) -> KvmlabError:
        """This error carrying the task's report: under --json one document holds both."""
        self.report = dict(report)
        return self

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self.message if not self.hint else f"{self.message} (hint: {self.hint})"


class ConfigError(KvmlabError):
    """Bad setting, flag or environment variable."""


class RecipeError(KvmlabError):
    """A recipe is missing, unparsable or invalid."""


class FetchError(KvmlabError):
    """Downloading or locating a source failed."""


class ChecksumError(FetchError):
    """A source's sha256 does not match the pinned or locked value."""


class UnpackError(KvmlabError):
    """A source archive is unsafe or unreadable."""


class PatchError(KvmlabError):
    """A patch series does not apply."""


class DockerError(KvmlabError):
    """The docker daemon is unreachable or an image is missing."""


class BuildError(KvmlabError):
    """Configure/make failed or artifacts are missing."""


class InstallError(KvmlabError):
    """Installing artifacts or firmware failed."""


class HostError(KvmlabError):
    """A host check or module operation failed."""


class ImageError(KvmlabError):
    """Creating or inspecting a disk image failed."""


class VMError(KvmlabError):
    """A VM did not boot, timed out or could not be started."""


class VerifyError(KvmlabError):
    """testinfra checks failed."""


class LabError(KvmlabError):
    """The lab pipeline or its lock comparison failed."""


class ReportError(KvmlabError):
    """The lab report cannot be drawn or written (no lab recorded, plotting library missing)."""
