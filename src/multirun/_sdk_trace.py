"""Imports ``opentelemetry.sdk.trace`` even with a bad ``OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT``.

The SDK reads that variable, into a module constant it no longer uses, as the
module is imported, and fails the import (so ``import multirun``) on a value
that is not a limit. Such a value is hidden for the import: ``init`` refuses it
by name later, and a run without ``init`` logs it. The package imports this
module before any other.
"""

from __future__ import annotations

import importlib
import os
import sys

from multirun._process import is_count

_READ_AT_IMPORT = "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT"


def _import_sdk_trace() -> None:
    raw = os.environ.get(_READ_AT_IMPORT)
    if "opentelemetry.sdk.trace" in sys.modules or raw is None or not raw.strip() or is_count(raw.strip()):
        importlib.import_module("opentelemetry.sdk.trace")
        return
    del os.environ[_READ_AT_IMPORT]
    try:
        importlib.import_module("opentelemetry.sdk.trace")
    finally:
        os.environ[_READ_AT_IMPORT] = raw


_import_sdk_trace()
