"""Packages the ``test`` extra installs: a test that needs one fails when it is missing.

A skip would let CI pass with a broken setup (the extra no longer installing one of
them) while testing nothing of what depends on it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest

HINT = "pip install -e '.[test]' (scripts/test does it)"


def required(module: str) -> ModuleType:
    """``module``, imported; missing, the calling test fails with how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as missing:
        pytest.fail(f"{module} is not installed ({missing}): {HINT}", pytrace=False)
