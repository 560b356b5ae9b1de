"""The Collector built from builder-config.yaml: exactly its components, and the shipped config valid."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from typing import Any

import pytest
from stack_servers import BUILDER_MANIFEST, COLLECTOR_CONFIG, COLLECTOR_ENV, ROOT, built_binary

pytestmark = pytest.mark.stack

COMPOSE_FILE = ROOT / "collector-config" / "docker-compose.yml"
KINDS = ("receivers", "processors", "exporters", "extensions", "connectors")


def otelcol(*args: str) -> subprocess.CompletedProcess[str]:
    """The built Collector run with ``args`` and none of the configuration's variables set: their defaults."""
    env = {key: value for key, value in os.environ.items() if key not in COLLECTOR_ENV}
    for name in ("JAEGER_ENDPOINT", "TEMPO_ENDPOINT", "JAEGER_INSECURE", "TEMPO_INSECURE"):
        env.pop(name, None)
    binary = built_binary("otelcol", "MULTIRUN_OTELCOL")
    return subprocess.run([binary, *args], capture_output=True, text=True, env=env, timeout=60, check=False)


def manifest_modules() -> dict[str, set[str]]:
    """The ``gomod`` entries of builder-config.yaml, by section."""
    modules: dict[str, set[str]] = {}
    section = ""
    for line in BUILDER_MANIFEST.read_text().splitlines():
        heading = re.match(r"^(\w+):\s*$", line)
        if heading:
            section = heading.group(1)
        entry = re.match(r"^\s*-\s*gomod:\s*(\S+ \S+)\s*$", line)
        if entry:
            modules.setdefault(section, set()).add(entry.group(1))
    return modules


def built_components() -> dict[str, dict[str, str]]:
    """``otelcol components``: component name -> module, by section."""
    result = otelcol("components")
    assert result.returncode == 0, result.stderr
    components: dict[str, dict[str, str]] = {}
    section, name = "", ""
    for line in result.stdout.splitlines():
        heading = re.match(r"^(\w+):", line)
        if heading:
            section = heading.group(1)
            components.setdefault(section, {})
            continue
        item = re.match(r"^\s*- (?:name|scheme): (\S+)", line)
        if item:
            name = item.group(1)
        module = re.match(r"^\s+module: (\S+ \S+)", line)
        if module and section:
            components[section][name] = module.group(1)
    return components


def resolved_config() -> dict[str, Any]:
    result = otelcol("print-config", "--format=json", "--config", str(COLLECTOR_CONFIG))
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = json.loads(result.stdout)
    return config


def test_shipped_config_is_valid() -> None:
    """``otelcol validate`` accepts collector-config/otelcol-config.yaml as shipped (default addresses)."""
    result = otelcol("validate", "--config", str(COLLECTOR_CONFIG))
    assert result.returncode == 0, f"otelcol validate failed:\n{result.stdout}\n{result.stderr}"


def test_binary_has_exactly_the_manifest_components() -> None:
    """The built binary's components are the manifest's modules, at the manifest's versions."""
    built = built_components()
    manifest = manifest_modules()
    for section in (*KINDS, "providers"):
        assert set(built.get(section, {}).values()) == manifest.get(section, set()), section


def test_manifest_has_exactly_what_the_config_uses() -> None:
    """Every component type the config uses is built in, and nothing it does not use."""
    built = built_components()
    config = resolved_config()
    for kind in KINDS:
        used = {component_id.split("/")[0] for component_id in config.get(kind) or {}}
        assert used == set(built.get(kind, {})), (
            f"{kind}: the config uses {used}, the binary has {set(built[kind])}"
        )
    pipelines = config["service"]["pipelines"]
    assert set(pipelines) == {"traces", "metrics"}
    assert pipelines["traces"]["exporters"] == ["otlp/jaeger", "otlp/tempo"]
    for pipeline in pipelines.values():
        assert pipeline["processors"][0] == "memory_limiter", "memory_limiter must come first"


def test_default_addresses_suit_the_compose_stack() -> None:
    """Without environment variables the config listens on every interface and sends to compose services."""
    config = resolved_config()
    protocols = config["receivers"]["otlp"]["protocols"]
    assert protocols["grpc"]["endpoint"] == "0.0.0.0:4317"
    assert protocols["http"]["endpoint"] == "0.0.0.0:4318"
    assert config["exporters"]["prometheus"]["endpoint"] == "0.0.0.0:8889"
    hosts = {
        name: config["exporters"][name]["endpoint"].rsplit(":", 1)[0]
        for name in ("otlp/jaeger", "otlp/tempo")
    }
    assert hosts == {"otlp/jaeger": "jaeger", "otlp/tempo": "tempo"}
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.fail("docker-compose is not on PATH: install the Debian package docker-compose", pytrace=False)
    services = subprocess.run(
        [compose, "-f", str(COMPOSE_FILE), "config", "--services"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert services.returncode == 0, services.stderr
    missing = set(hosts.values()) - set(services.stdout.split())
    assert not missing, f"the config sends traces to {missing}, which {COMPOSE_FILE.name} does not define"
