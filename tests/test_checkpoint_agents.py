"""Agent state (``AgentContext.set_state``) is in every checkpoint, and back in the agent on resume."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import multirun
from multirun import agent, checkpoint, run
from multirun.checkpoints.serializers import JsonSerializer, dump_blob, load_blob
from multirun.checkpoints.store import parse_checkpoint_key
from multirun.context import get_current_agent_context, get_current_run_context
from multirun.errors import ReplayError
from multirun.telemetry import attributes as attr


def crashed_run_id(traced, job, *args: Any) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(RuntimeError):
        job(*args)
    return str(traced.named(f"invoke_workflow {job.__name__}")[-1].attributes[attr.RUN_ID])


def test_an_agent_gets_back_the_state_its_own_checkpoint_kept(traced) -> None:
    seen: list[object] = []

    @agent(name="researcher")
    def researcher() -> object:
        me = get_current_agent_context()
        seen.append(me.get_state("found"))
        if me.get_state("found") is None:
            me.set_state("found", ["doc1", "doc2"])
            me.checkpoint(name="after_search")
            raise RuntimeError("crash after the checkpoint")
        return me.get_state("found")

    @run(checkpoint_on_error=False)
    def job() -> object:
        return researcher()

    run_id = crashed_run_id(traced, job)
    with multirun.resume(run_id=run_id) as restored:
        assert job() == ["doc1", "doc2"]
    assert seen == [None, ["doc1", "doc2"]]
    assert restored.state == {}  # the agent's state is its own, not the run's


def test_the_runs_own_checkpoints_keep_every_agents_state(traced) -> None:
    """On error and @checkpoint: the named agents (each call of a name apart) and the default agent."""
    seen: list[tuple[str, object]] = []

    @agent(name="writer")
    def writer(draft: str) -> None:
        me = get_current_agent_context()
        seen.append(("writer", me.get_state("draft")))
        me.set_state("draft", draft)

    @checkpoint(name="drafted")
    def drafted() -> None:
        pass

    @run
    def job(crash: bool) -> None:
        default = get_current_agent_context()
        seen.append(("default", default.get_state("step")))
        default.set_state("step", "drafting")
        writer("v1")
        drafted()
        writer("v2")
        if crash:
            raise RuntimeError("crash")  # the run's on-error checkpoint

    run_id = crashed_run_id(traced, job, True)
    store = traced.client.checkpoints
    on_error = store.load(store.latest(run_id))
    assert on_error.checkpoint.name == "on_error_RuntimeError"
    assert sorted((a["name"], a["occurrence"], a["state"]) for a in on_error.agents) == [
        ("job", 0, {"step": "drafting"}),
        ("writer", 1, {"draft": "v1"}),
        ("writer", 2, {"draft": "v2"}),
    ]
    ids = sorted(found.checkpoint_id for found in map(parse_checkpoint_key, store.list(run_id)) if found)
    at_drafted = store.load(ids[0])
    assert at_drafted.checkpoint.name == "drafted"
    assert sorted(a["name"] for a in at_drafted.agents) == ["job", "writer"]

    seen.clear()
    with multirun.resume(run_id=run_id):
        job(False)
    assert seen == [("default", "drafting"), ("writer", "v1"), ("writer", "v2")]


def test_a_resumed_run_that_dies_before_an_agent_starts_again_keeps_its_state(traced) -> None:
    @agent(name="planner")
    def planner() -> object:
        me = get_current_agent_context()
        if me.get_state("plan") is None:
            me.set_state("plan", "three steps")
        return me.get_state("plan")

    @run
    def job(crash_before_planning: bool) -> object:
        if crash_before_planning:
            raise RuntimeError("crash")
        plan = planner()
        get_current_run_context().checkpoint(name="planned")
        raise RuntimeError(f"crash after {plan}")

    first = crashed_run_id(traced, job, False)
    with multirun.resume(run_id=first):
        second = crashed_run_id(traced, job, True)  # the planner did not start again
    store = traced.client.checkpoints
    kept = store.load(store.latest(second)).agents
    assert kept == [{"name": "planner", "occurrence": 1, "state": {"plan": "three steps"}}]


def test_an_agent_state_restored_with_restore_from_checkpoint_reaches_a_running_agent(traced) -> None:
    @run
    def first() -> str:
        get_current_agent_context().set_state("n", 1)
        return get_current_run_context().checkpoint(name="c").value.id

    checkpoint_id = first()

    @run(name="first")
    def again() -> object:
        default = get_current_agent_context()  # started before the restore
        get_current_run_context().restore_from_checkpoint(checkpoint_id)
        return default.get_state("n")

    assert again() == 1


def test_an_agent_state_in_a_checkpoint_written_before_agent_states_were_kept_comes_back(traced) -> None:
    """Older versions wrote only ``AgentContext.checkpoint``'s state, in the run's state."""
    document = {
        "checkpoint": {
            "id": "c-old",
            "run_id": "r-old",
            "name": "x",
            "created_at": "2025-01-01T00:00:00+00:00",
        },
        "state": {"agent:researcher": {"found": ["doc1"]}},
        "replay": [],
        "ledger": {},
    }
    blob, _ = dump_blob(document, JsonSerializer())
    traced.client.checkpoints.exporter.put("checkpoints/r-old/c-old.ckpt", blob)

    @agent(name="researcher")
    def researcher() -> object:
        return get_current_agent_context().get_state("found")

    @run
    def job() -> object:
        return researcher()

    with multirun.resume(checkpoint_id="c-old"):
        assert job() == ["doc1"]


def rewrite_checkpoint(traced, run_id: str, change: Callable[[dict[str, Any]], None]) -> None:  # type: ignore[no-untyped-def]
    """Apply ``change`` to the document of ``run_id``'s newest checkpoint, sealed again."""
    store = traced.client.checkpoints
    key = store.find(store.latest(run_id))
    path = store.exporter.directory / key
    _, document = load_blob(path.read_bytes(), max_bytes=1 << 20)
    change(document)
    path.chmod(0o644)  # the store writes blobs read-only
    path.write_bytes(dump_blob(document, JsonSerializer())[0])


# a sub-run's record is not checked when its checkpoint is loaded: malformed entries are left out
MALFORMED_AGENT_STATES = ["junk", {"name": "helper", "occurrence": 1}, {"name": 2}]


@pytest.mark.parametrize(
    "malformed", [[], MALFORMED_AGENT_STATES], ids=["as written", "malformed ones added"]
)
def test_a_sub_runs_agents_get_their_state_back_when_the_top_run_resumes(traced, malformed) -> None:
    seen: list[object] = []

    @agent(name="helper")
    def helper() -> None:
        me = get_current_agent_context()
        seen.append(me.get_state("memo"))
        me.set_state("memo", "kept")

    @run
    def sub() -> None:
        helper()

    @run(checkpoint_on_error=False)
    def top(crash: bool) -> None:
        sub()
        get_current_run_context().checkpoint(name="after sub")
        if crash:
            raise RuntimeError("crash")

    def add_malformed(document: dict[str, Any]) -> None:
        (record,) = [r for r in document["replay"] if "run" in r]
        record["run"]["agents"][:0] = malformed

    run_id = crashed_run_id(traced, top, True)
    rewrite_checkpoint(traced, run_id, add_malformed)
    with multirun.resume(run_id=run_id):
        top(False)
    assert seen == [None, "kept"]


def test_an_agent_state_that_cannot_be_written_costs_a_warning_not_the_checkpoint(traced, caplog) -> None:
    import logging

    @agent(name="holder")
    def holder() -> None:
        get_current_agent_context().set_state("client", object())  # no JSON form

    @run
    def job() -> str:
        holder()
        get_current_run_context().set_state("kept", 1)
        return get_current_run_context().checkpoint(name="c").value.id

    with caplog.at_level(logging.WARNING, logger="multirun"):
        checkpoint_id = job()
    restored = traced.client.checkpoints.load(checkpoint_id)
    assert restored.state == {"kept": 1} and restored.agents == []
    assert "state of agent 'holder' is left out" in caplog.text


def test_a_sub_runs_agent_state_that_cannot_be_written_costs_a_warning_not_the_checkpoint(
    traced, caplog
) -> None:
    import logging

    @agent(name="holder")
    def holder() -> None:
        get_current_agent_context().set_state("client", object())  # no JSON form

    @run
    def sub() -> None:
        get_current_run_context().set_state("sub", "kept")
        holder()

    @run
    def job() -> str:
        sub()
        return get_current_run_context().checkpoint(name="c").value.id

    with caplog.at_level(logging.WARNING, logger="multirun"):
        checkpoint_id = job()
    sub_record = next(r for r in traced.client.checkpoints.load(checkpoint_id).replay if "run" in r)
    assert sub_record["run"]["state"] == {"sub": "kept"} and sub_record["run"]["agents"] == []
    assert "state of agent 'holder' is left out" in caplog.text


def test_a_checkpoint_with_a_malformed_agent_state_is_refused(traced) -> None:
    @agent(name="helper")
    def helper() -> None:
        get_current_agent_context().set_state("memo", "kept")

    @run(checkpoint_on_error=False)
    def job() -> None:
        helper()
        get_current_run_context().checkpoint(name="after helper")
        raise RuntimeError("crash")

    run_id = crashed_run_id(traced, job)
    rewrite_checkpoint(traced, run_id, lambda document: document["agents"].append({"name": "helper"}))
    with pytest.raises(ReplayError, match="malformed agent state"), multirun.resume(run_id=run_id):
        pass
