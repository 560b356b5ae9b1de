"""Attribute names, span naming, the local OTLP JSON exporter and metric instruments."""
