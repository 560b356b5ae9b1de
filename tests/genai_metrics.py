"""What an in-memory reader of the GenAI metrics read (its fixture, ``metric_reader``, is in conftest)."""

from __future__ import annotations

from typing import Any

from opentelemetry.sdk.metrics.export import InMemoryMetricReader


def points(reader: InMemoryMetricReader, name: str) -> list[Any]:
    """The data points of metric ``name``, as the reader reads them now."""
    data = reader.get_metrics_data()
    return [
        point
        for resource in (data.resource_metrics if data else ())
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == name
        for point in metric.data.data_points
    ]


def operations(reader: InMemoryMetricReader, name: str) -> set[str]:
    """The ``gen_ai.operation.name`` values of metric ``name``'s points."""
    return {point.attributes["gen_ai.operation.name"] for point in points(reader, name)}
