"""Fixtures for the testinfra checks: the controller's kvmlab settings and the recipe under test.

The checks run on the controller and inspect the target through testinfra's ``host`` fixture.
Settings reach them through KVMLAB_* environment variables (set by kvmlab.lab.verify).
"""
from __future__ import annotations

import os

import pytest

from kvmlab.core.settings import load_settings
from kvmlab.model.recipe import load_recipe


@pytest.fixture(scope="session")
def kvmlab_settings():
    return load_settings()


@pytest.fixture(scope="session")
def recipe(kvmlab_settings):
    return load_recipe(kvmlab_settings.recipes_dir, kvmlab_settings.recipe)


@pytest.fixture(scope="session")
def builder(kvmlab_settings):
    return kvmlab_settings.builder


@pytest.fixture(scope="session")
def verify_env():
    """Extra values a step passed to its checks (KVMLAB_VERIFY_* variables)."""
    return {k[len("KVMLAB_VERIFY_"):].lower(): v for k, v in os.environ.items()
            if k.startswith("KVMLAB_VERIFY_")}
