"""Invoke entry point: `invoke --list`. All logic lives in the kvmlab package."""
from kvmlab.tasks import ns  # noqa: F401
