"""Keys under which the current run, agent and step live in the OpenTelemetry context."""

from __future__ import annotations

from opentelemetry import context as otel_context

RUN_KEY = otel_context.create_key("multirun-run")
AGENT_KEY = otel_context.create_key("multirun-agent")
STEP_KEY = otel_context.create_key("multirun-step")
