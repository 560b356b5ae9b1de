"""Loading checkpoints: older formats resume, malformed ones are refused with a clear error."""

from __future__ import annotations

import datetime
import enum
import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from pydantic_core import to_jsonable_python

import multirun
from child_processes import environment_without_settings
from multirun import run, step
from multirun.checkpoints.serializers import JsonSerializer, dump_blob
from multirun.cli.main import main
from multirun.context import get_current_agent_context, get_current_run_context
from multirun.errors import CheckpointError, ReplayError
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


def v1_input_hash(*args: Any, **kwargs: Any) -> str:
    """A step's input hash as multirun-otel 0.1.0 computed it (JSON only, sets sorted by repr)."""

    def canonical(value: Any) -> Any:
        return sorted(value, key=repr) if isinstance(value, (set, frozenset)) else to_jsonable_python(value)

    text = json.dumps(
        [args, kwargs], sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=canonical
    )
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def v1_document(checkpoint_id: str, run_name: str, replay: list[list[Any]]) -> dict[str, Any]:
    """A checkpoint document as multirun-otel 0.1.0's store wrote it, with these cached steps."""
    return {
        "checkpoint": {
            "id": checkpoint_id,
            "run_id": f"r-{checkpoint_id}",
            "run_name": run_name,
            "name": "x",
            "created_at": "2025-01-02T03:04:05+00:00",
        },
        "state": {},
        "replay": replay,
        "ledger": {"tokens": 10, "cost_units": 0, "steps": len(replay)},
    }


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


class Tier(enum.Enum):
    GOLD = "gold"


def test_a_version_1_checkpoint_serves_steps_whose_arguments_are_all_scalars(traced) -> None:
    # multirun-otel 0.1.0 hashed these as JSON; input hashes of scalars are taken otherwise since
    day = datetime.date(2025, 1, 2)
    replay = [
        ["search", v1_input_hash("open telemetry", 3), ["doc-1", "doc-2"]],
        ["score", v1_input_hash(0.5, None, strict=True), 42],
        ["greet", v1_input_hash("héllo \ud800"), "hi"],
        ["plan", v1_input_hash(Tier.GOLD, day), "planned"],
    ]
    blob = v1_blob(v1_document("c-v1-scalars", "crew", replay))
    traced.client.checkpoints.exporter.put("checkpoints/r-c-v1-scalars/c-v1-scalars.ckpt", blob)
    calls: list[str] = []

    @step
    def search(query: str, top_k: int) -> list[str]:
        calls.append("search")
        return ["fresh"]

    @step
    def score(weight: float, prior: float | None, *, strict: bool) -> int:
        calls.append("score")
        return 0

    @step
    def greet(name: str) -> str:
        calls.append("greet")
        return "hello again"

    @step
    def plan(tier: Tier, when: datetime.date) -> str:
        calls.append("plan")
        return "planned again"

    @run
    def crew() -> list[object]:
        # the reference's replay cache pattern: a result found is served, the step not called
        found, cached = get_current_agent_context().get_step_result("greet", ("héllo \ud800",)).value
        return [
            (found, cached),
            cached if found else greet("héllo \ud800"),
            score(0.5, None, strict=True),
            plan(Tier.GOLD, day),
            search("open telemetry", 3),
            search("other", 3),  # not cached: it runs
        ]

    with multirun.resume(checkpoint_id="c-v1-scalars"):
        assert crew() == [(True, "hi"), "hi", 42, "planned", ["doc-1", "doc-2"], ["fresh"]]
    assert calls == ["search"]


def test_checkpoints_show_and_verify_read_a_version_1_checkpoint(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "checkpoints" / "run-golden"
    folder.mkdir(parents=True)
    shutil.copy(GOLDEN / "checkpoint-v1-json.ckpt", folder / "ckpt-golden-v1.ckpt")

    assert main(["checkpoints", "verify", "--store", str(tmp_path)]) == 0
    assert "1 ok, 0 failed" in capsys.readouterr().out
    assert main(["checkpoints", "show", "ckpt-golden-v1", "--store", str(tmp_path)]) == 0
    assert "1 step, 1 with a result to serve" in capsys.readouterr().out


def test_checkpoints_show_and_verify_read_the_golden_version_4_pickle_checkpoint(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.setenv(
        "MULTIRUN_CHECKPOINT_HMAC_KEY", "raw:multirun golden files: test-only key, not a secret"
    )
    folder = tmp_path / "checkpoints" / "run-golden"
    folder.mkdir(parents=True)
    shutil.copy(GOLDEN / "checkpoint-v4-pickle.ckpt", folder / "ckpt-golden-v4.ckpt")

    assert main(["checkpoints", "verify", "--store", str(tmp_path)]) == 0
    assert "1 ok, 0 failed" in capsys.readouterr().out
    assert main(["checkpoints", "show", "ckpt-golden-v4", "--store", str(tmp_path)]) == 0
    shown = {line[:11].rstrip(): line[12:] for line in capsys.readouterr().out.splitlines()}
    assert shown["run"] == "run-golden (golden)" and shown["name"] == "after_fetch"
    assert shown["state keys"] == "amount, big, nested, raw, tags, text, unique, when"
    assert shown["agents"] == "planner (plan)"
    assert shown["replay log"] == "2 steps, 1 with a result to serve"
    assert shown["trace"] == "0af7651916cd43dd8448eb211c80319c"


GOLDEN_KEY_TEXT = "raw:multirun golden files: test-only key, not a secret"  # tests/golden/README.md


def old_pickle_of_main_store(tmp_path: Path) -> Path:
    """A store holding the golden version 3 pickle checkpoint of objects of a class of __main__."""
    folder = tmp_path / "checkpoints" / "run-golden-main"
    folder.mkdir(parents=True)
    shutil.copy(GOLDEN / "checkpoint-v3-pickle-main.ckpt", folder / "ckpt-golden-v3-main.ckpt")
    return folder / "ckpt-golden-v3-main.ckpt"


def test_checkpoints_show_and_verify_an_old_pickle_checkpoint_of_classes_of_main_without_its_program(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    # format version 3 has no summary: the command line used to unpickle it, and failed with
    # "Can't get attribute 'Notes' on <module '__main__'>" (show: an error, verify: FAILED)
    monkeypatch.setenv("MULTIRUN_CHECKPOINT_HMAC_KEY", GOLDEN_KEY_TEXT)
    path = old_pickle_of_main_store(tmp_path)
    store = ["--store", str(tmp_path)]

    assert main(["checkpoints", "verify", *store]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("ok      ckpt-golden-v3-main  (HMAC and digests verified; its contents need ")
    assert out[-1] == "1 ok, 0 failed"

    assert main(["checkpoints", "show", "ckpt-golden-v3", *store]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and captured.err == ""
    shown = {line[:11].rstrip(): line[12:] for line in captured.out.splitlines()}
    assert shown["checkpoint"] == "ckpt-golden-v3-main"
    assert shown["run"] == "run-golden-main"
    assert shown["size"] == f"{path.stat().st_size} bytes"
    assert shown["key"] == "checkpoints/run-golden-main/ckpt-golden-v3-main.ckpt"
    assert shown["format"] == "version 3, pickle, signed: HMAC verified"
    contents = shown["contents"]
    assert contents.startswith("not read here: they need the classes of the program that wrote them")
    assert "Can't get attribute 'Notes'" in contents
    assert "multirun resume ckpt-golden-v3-main -- python" in contents
    assert "state keys" not in shown  # nothing is made up for what could not be read

    # the signature is still checked: with another key the checkpoint is refused, as before
    monkeypatch.setenv("MULTIRUN_CHECKPOINT_HMAC_KEY", "raw:another key, at least 16 bytes")
    assert main(["checkpoints", "verify", *store]) == 1
    assert "HMAC does not match" in capsys.readouterr().out


@pytest.mark.parametrize("key", [None, "raw:another key, at least 16 bytes"], ids=["no key", "another key"])
def test_show_and_verify_of_an_old_signed_pickle_without_its_key_name_the_variable_only(
    tmp_path: Path, capsys, monkeypatch, key: str | None
) -> None:
    # the command line reads the key from MULTIRUN_CHECKPOINT_HMAC_KEY alone: advice to pass
    # it to multirun.init() or a CheckpointStore is advice its user cannot follow
    if key is None:
        monkeypatch.delenv("MULTIRUN_CHECKPOINT_HMAC_KEY", raising=False)
    else:
        monkeypatch.setenv("MULTIRUN_CHECKPOINT_HMAC_KEY", key)
    old_pickle_of_main_store(tmp_path)
    store = ["--store", str(tmp_path)]
    problem = "no HMAC key is configured" if key is None else "HMAC does not match"

    assert main(["checkpoints", "show", "ckpt-golden-v3", *store]) == 1
    captured = capsys.readouterr()
    [line] = captured.err.splitlines()
    assert captured.out == "" and line.startswith("multirun: error: checkpoint 'ckpt-golden-v3-main'")
    assert problem in line and line.endswith("(MULTIRUN_CHECKPOINT_HMAC_KEY)"), line

    assert main(["checkpoints", "verify", *store]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("FAILED  ckpt-golden-v3-main: ") and problem in out[0]
    assert out[0].endswith("(MULTIRUN_CHECKPOINT_HMAC_KEY)"), out[0]
    assert out[1] == "0 ok, 1 failed"


def test_a_program_that_reads_json_only_is_told_how_to_resume_a_pickle_checkpoint(
    traced, tmp_path: Path, monkeypatch
) -> None:
    # the refusal said "add 'pickle' to allowed_serializers", an argument init does not have
    monkeypatch.setenv("MULTIRUN_CHECKPOINT_HMAC_KEY", GOLDEN_KEY_TEXT)
    folder = tmp_path / "blobs" / "checkpoints" / "run-golden"  # the traced fixture's store
    folder.mkdir(parents=True)
    shutil.copy(GOLDEN / "checkpoint-v4-pickle.ckpt", folder / "ckpt-golden-v4.ckpt")
    with pytest.raises(CheckpointError) as refused, multirun.resume(run_id="run-golden"):
        pass
    message = str(refused.value)
    assert "'pickle' serializer, which this reader does not allow" in message
    assert "MULTIRUN_CHECKPOINT_SERIALIZER or multirun.init(checkpoint_serializer=...)" in message

    monkeypatch.setenv("MULTIRUN_CHECKPOINT_SERIALIZER", "pickle")  # the advice, followed
    multirun.init(tracer_provider=traced.provider, checkpoint_uri=str(tmp_path / "blobs"))
    with multirun.resume(run_id="run-golden") as restored:
        assert restored.checkpoint.name == "after_fetch"


RESEARCHER = """
import sys
from dataclasses import dataclass

import multirun
from multirun import run
from multirun.context import get_current_run_context

multirun.init_local(sys.argv[1], checkpoint_serializer="pickle")


@dataclass
class Notes:  # the class of __main__ the checkpoint holds objects of
    topic: str


@run(name="researcher")
def researcher() -> None:
    print("STATE", get_current_run_context().get_state("notes"), flush=True)


researcher()
"""


def test_an_old_pickle_checkpoint_of_classes_of_main_resumes_in_its_program(tmp_path: Path) -> None:
    import subprocess
    import sys

    old_pickle_of_main_store(tmp_path / "mr" / "blobs")
    script = tmp_path / "researcher.py"
    script.write_text(RESEARCHER)
    env = environment_without_settings()
    env["MULTIRUN_CHECKPOINT_HMAC_KEY"] = GOLDEN_KEY_TEXT
    multirun_cli = str(Path(sys.executable).parent / "multirun")
    command = [multirun_cli, "resume", "--dir", str(tmp_path / "mr"), "ckpt-golden-v3"]
    resumed = subprocess.run(
        [*command, "--", sys.executable, str(script), str(tmp_path / "mr")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert resumed.returncode == 0, resumed.stderr  # the command line no longer unpickles it first
    assert "resuming run run-golden-main from checkpoint ckpt-golden-v3-main" in resumed.stderr
    assert "STATE Notes(topic='otel')" in resumed.stdout  # the program unpickled it


def put_document(traced, checkpoint_id: str, **parts: Any) -> None:  # type: ignore[no-untyped-def]
    """A checkpoint whose envelope verifies, holding what ``parts`` say."""
    document = {
        "checkpoint": {
            "id": checkpoint_id,
            "run_id": "r-bad",
            "name": "x",
            "created_at": "2025-01-01T00:00:00+00:00",
        },
        "state": {},
        "replay": [],
        "ledger": {},
        **parts,
    }
    blob, _ = dump_blob(document, JsonSerializer())
    traced.client.checkpoints.exporter.put(f"checkpoints/r-bad/{checkpoint_id}.ckpt", blob)


GOOD_RECORD = {"name": "s", "digest": "d", "occurrence": 1, "seq": 0, "parent": None, "end": 1, "lane": 0}
MALFORMED_RECORDS = [
    ({k: v for k, v in GOOD_RECORD.items() if k != "seq"}, "has no 'seq'"),
    ({**GOOD_RECORD, "lane": "x"}, "'lane' 'x'"),
    ({**GOOD_RECORD, "parent": "p"}, "'parent' 'p'"),
    ({**GOOD_RECORD, "seq": 3, "parent": 3}, "'parent' 3"),  # a call inside itself
    ({**GOOD_RECORD, "occurrence": 1.5}, "'occurrence' 1.5"),
    ({**GOOD_RECORD, "occurrence": math.inf}, "'occurrence' inf"),
    ({**GOOD_RECORD, "end": -1}, "'end' -1"),
    ({**GOOD_RECORD, "name": None}, "'name'"),
    (["s", "d", 1], "is a list"),
]


@pytest.mark.parametrize(("record", "problem"), MALFORMED_RECORDS, ids=[p for _, p in MALFORMED_RECORDS])
def test_a_malformed_replay_record_is_a_replay_error_naming_the_checkpoint(traced, record, problem) -> None:
    put_document(traced, "c-bad", replay=[GOOD_RECORD, record])

    @run
    def job() -> None:
        pass

    with (
        pytest.raises(ReplayError, match="checkpoint 'c-bad' cannot be replayed") as raised,
        multirun.resume(checkpoint_id="c-bad"),
    ):
        job()
    assert "record #2" in str(raised.value)
    assert problem in str(raised.value)


@pytest.mark.parametrize("where", ["ledger", "replay"])
def test_show_and_verify_say_a_checkpoint_holding_infinity_is_damaged(traced, capsys, where) -> None:
    if where == "ledger":
        put_document(traced, "c-inf", ledger={"tokens": math.inf})
    else:
        put_document(traced, "c-inf", replay=[{**GOOD_RECORD, "seq": math.inf}])
    store = str(traced.client.checkpoints.exporter.directory)

    assert main(["checkpoints", "verify", "--store", store]) == 1
    out = capsys.readouterr().out
    assert "FAILED  c-inf: checkpoint 'c-inf' cannot be replayed" in out
    assert main(["checkpoints", "show", "c-inf", "--store", store]) == 1
    assert "cannot be replayed" in capsys.readouterr().err


@pytest.mark.parametrize("part", ["checkpoint", "state", "ledger", "trace"])
def test_a_checkpoint_whose_part_is_not_a_json_object_is_a_replay_error_naming_it(
    traced, capsys, part
) -> None:
    put_document(traced, "c-list", **{part: [["tokens", 1]]})
    store = str(traced.client.checkpoints.exporter.directory)

    @run
    def job() -> None:
        pass

    with (
        pytest.raises(ReplayError, match=f"checkpoint 'c-list' cannot be replayed: its {part} is a list"),
        multirun.resume(checkpoint_id="c-list"),
    ):
        job()
    assert main(["checkpoints", "verify", "--store", store]) == 1
    assert "FAILED  c-list: checkpoint 'c-list' cannot be replayed" in capsys.readouterr().out
    assert main(["checkpoints", "show", "c-list", "--store", store]) == 1
    assert "cannot be replayed" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("about", "problem"),
    [(None, "it has no 'checkpoint' object"), ({"id": "c-part"}, "its checkpoint has no 'run_id'")],
    ids=["no checkpoint object", "no run id"],
)
def test_a_checkpoint_missing_a_part_says_which_part(traced, capsys, about, problem) -> None:
    # the message was the bare KeyError: "cannot be replayed: 'checkpoint'"
    document = {"state": {}, "replay": [], "ledger": {}}
    if about is not None:
        document["checkpoint"] = about
    traced.client.checkpoints.exporter.put(
        "checkpoints/r-bad/c-part.ckpt", dump_blob(document, JsonSerializer())[0]
    )
    store = str(traced.client.checkpoints.exporter.directory)
    assert main(["checkpoints", "show", "c-part", "--store", store]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"multirun: error: checkpoint 'c-part' cannot be replayed: {problem}"
    ]


def test_a_damaged_newest_checkpoint_names_itself_and_the_one_to_resume_instead(traced) -> None:
    @step
    def stage(i: int) -> int:
        return i

    @run
    def job() -> tuple[str, str]:
        ctx = get_current_run_context()
        stage(1)
        first = ctx.checkpoint(name="first").value.id
        stage(2)
        return first, ctx.checkpoint(name="second").value.id

    first, second = job()
    store = traced.client.checkpoints
    path = store.exporter.directory / store.find(second)
    data = path.read_bytes()
    path.chmod(0o644)
    path.write_bytes(data[: len(data) // 2])
    run_id = store.load(first).checkpoint.run_id

    with pytest.raises(CheckpointError) as raised, multirun.resume(run_id=run_id):
        pass
    message = str(raised.value)
    assert f"checkpoint {second!r}" in message and "truncated" in message
    assert f"multirun.resume(checkpoint_id={first!r})" in message
    with multirun.resume(checkpoint_id=first) as restored:  # and that one loads
        assert restored.checkpoint.id == first


def test_a_damaged_checkpoint_resumed_from_a_deleted_working_directory_is_refused_as_it_is(
    traced, tmp_path, monkeypatch
) -> None:
    # the message's `multirun resume` command compared the store with ./.multirun/blobs made
    # absolute: os.getcwd() raised FileNotFoundError in place of the CheckpointError
    monkeypatch.delenv("MULTIRUN_DIR", raising=False)

    @run
    def job() -> tuple[str, str]:
        ctx = get_current_run_context()
        return ctx.checkpoint(name="first").value.id, ctx.checkpoint(name="second").value.id

    first, second = job()
    store = traced.client.checkpoints
    path = store.exporter.directory / store.find(second)
    path.write_bytes(path.read_bytes()[:-5])
    gone = tmp_path / "gone"
    gone.mkdir()
    before = os.getcwd()
    os.chdir(gone)
    try:
        gone.rmdir()
        with pytest.raises(CheckpointError) as refused, multirun.resume(checkpoint_id=second):
            pass
    finally:
        os.chdir(before)
    message = str(refused.value)
    assert f"multirun.resume(checkpoint_id={first!r})" in message
    assert f"`multirun resume {first} --store {store.exporter.directory} -- ...`" in message
