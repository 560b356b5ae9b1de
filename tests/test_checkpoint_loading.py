"""Loading checkpoints: older formats resume, malformed ones are refused with a clear error."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import multirun
from multirun import run, step
from multirun.cli.main import main
from multirun.context import get_current_run_context
from multirun.telemetry import attributes as attr

GOLDEN = Path(__file__).parent / "golden"


def v1_blob(document: dict[str, Any]) -> bytes:
    """A version 1 blob, as multirun-otel 0.1.0 sealed one (see tests/golden/make_golden.py)."""
    payload = json.dumps(document, separators=(",", ":")).encode("utf-8")
    header = {
        "version": 1,
        "serializer": "json",
        "size": len(payload),
        "digest": "sha256:" + hashlib.sha256(payload).hexdigest(),
    }
    return b"MRCK1\n" + json.dumps(header, separators=(",", ":"), sort_keys=True).encode() + b"\n" + payload


def v1_input_hash(*args: Any) -> str:
    """A step's input hash as multirun-otel 0.1.0 computed it (JSON only)."""
    text = json.dumps([args, {}], sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def test_the_golden_version_1_checkpoint_resumes_with_its_state_and_spend(traced) -> None:
    folder = traced.client.checkpoints.exporter.directory / "checkpoints" / "run-golden"
    folder.mkdir(parents=True)
    shutil.copy(GOLDEN / "checkpoint-v1-json.ckpt", folder / "ckpt-golden-v1.ckpt")
    calls: list[str] = []

    @step
    def plan(n: int) -> int:  # not in the checkpoint: it runs
        calls.append("plan")
        return n

    @run
    def golden() -> object:
        plan(1)
        return get_current_run_context().get_state("text")

    with multirun.resume(run_id="run-golden") as restored:
        assert golden() == "héllo wörld 😀"
    assert restored.replay[0]["name"] == "fetch" and restored.replay[0]["result"] == {
        "status": 200,
        "body": "ok",
    }
    assert calls == ["plan"]
    assert traced.named("invoke_workflow golden")[-1].attributes[attr.TOKENS_USED] == 1234


def test_a_version_1_checkpoint_serves_the_steps_it_cached_in_any_order(traced) -> None:
    document = {
        "checkpoint": {
            "id": "c-v1",
            "run_id": "r-v1",
            "run_name": "crew",
            "name": "x",
            "created_at": "2025-01-02T03:04:05+00:00",
        },
        "state": {},
        "replay": [
            ["fetch", v1_input_hash({"url": "a"}), {"status": 200}],
            ["parse", v1_input_hash([1, 2]), "parsed"],
        ],
        "ledger": {"tokens": 10, "cost_units": 0, "steps": 2},
    }
    traced.client.checkpoints.exporter.put("checkpoints/r-v1/c-v1.ckpt", v1_blob(document))
    calls: list[str] = []

    @step
    def fetch(request: dict[str, str]) -> dict[str, int]:
        calls.append("fetch")
        return {"status": 500}

    @step
    def parse(data: list[int]) -> str:
        calls.append("parse")
        return "parsed again"

    @step
    def new_step(data: list[int]) -> str:
        calls.append("new_step")
        return "new"

    @run
    def crew() -> list[object]:
        return [parse([1, 2]), new_step([3]), fetch({"url": "a"}), fetch({"url": "b"})]

    with multirun.resume(checkpoint_id="c-v1"):
        assert crew() == ["parsed", "new", {"status": 200}, {"status": 500}]
    assert calls == ["new_step", "fetch"]  # fetch({"url": "b"}) was never cached


def test_checkpoints_show_and_verify_read_a_version_1_checkpoint(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "checkpoints" / "run-golden"
    folder.mkdir(parents=True)
    shutil.copy(GOLDEN / "checkpoint-v1-json.ckpt", folder / "ckpt-golden-v1.ckpt")

    assert main(["checkpoints", "verify", "--store", str(tmp_path)]) == 0
    assert "1 ok, 0 failed" in capsys.readouterr().out
    assert main(["checkpoints", "show", "ckpt-golden-v1", "--store", str(tmp_path)]) == 0
    assert "1 step, 1 with a result to serve" in capsys.readouterr().out
