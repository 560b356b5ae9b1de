"""The replay log on its own: what a restored run is told about calls that did not return."""

from __future__ import annotations

import pytest

from multirun.checkpoints.replay import ReplayLog, Served
from multirun.errors import DeterminismError


def restored(record_calls) -> ReplayLog:  # type: ignore[no-untyped-def]
    """A log loaded from the records of another log that ``record_calls`` filled."""
    recording = ReplayLog()
    record_calls(recording)
    log = ReplayLog()
    log.load(recording.to_records())
    return log


def test_a_call_running_at_the_checkpoint_is_not_offered_as_a_cached_result() -> None:
    log = restored(lambda rec: rec.begin("plan", "d1", parent=None))
    # it used to answer (True, None): a cached None for a call that never returned
    assert log.take("plan", "d1", parent=None) == (False, None)  # get_step_result's answer
    assert isinstance(log.begin("plan", "d1", parent=None), tuple)  # it runs again


def test_a_failed_call_retried_until_it_returned_is_answered_with_the_retry_result() -> None:
    def retried(rec: ReplayLog) -> None:
        for _ in range(2):
            rec.fail(rec.begin("ask", "d1", parent=None))  # type: ignore[arg-type]
        rec.record(rec.begin("ask", "d1", parent=None), "answer")  # type: ignore[arg-type]

    log = restored(retried)
    served = log.begin("ask", "d1", parent=None)
    assert isinstance(served, Served) and served.value == "answer"
    assert not log.replaying  # the retries are not expected any more


def test_a_failed_call_followed_by_other_steps_is_not_answered() -> None:
    def handled(rec: ReplayLog) -> None:
        rec.fail(rec.begin("ask", "d1", parent=None))  # type: ignore[arg-type]
        rec.record(rec.begin("backup", "d1", parent=None), "backup answer")  # type: ignore[arg-type]
        rec.record(rec.begin("ask", "d1", parent=None), "late answer")  # type: ignore[arg-type]

    log = restored(handled)
    call = log.begin("ask", "d1", parent=None)
    assert not isinstance(call, Served)  # it runs again
    log.fail(call)  # type: ignore[arg-type]
    served = log.begin("backup", "d1", parent=None)
    assert isinstance(served, Served) and served.value == "backup answer"


def test_calls_after_the_replay_are_numbered_after_the_replayed_ones() -> None:
    log = restored(lambda rec: rec.record(rec.begin("page", "d1", parent=None), "first"))  # type: ignore[arg-type]
    assert isinstance(log.begin("page", "d1", parent=None), Served)
    assert not log.replaying
    log.record(log.begin("page", "d1", parent=None), "second")  # type: ignore[arg-type]
    again = ReplayLog()
    again.load(log.to_records())
    served = [again.begin("page", "d1", parent=None) for _ in range(2)]
    assert [s.value for s in served] == ["first", "second"]  # type: ignore[union-attr]


def test_a_sub_runs_part_of_a_log_holds_the_calls_made_inside_it_at_any_depth() -> None:
    from multirun.checkpoints.replay import sub_run_part

    log = ReplayLog()
    before = log.begin("before", "d0", None)
    log.record(before, 0)
    sub, _ = log.begin_run("research", "d1", None, lambda: {"state": {"topic": "otters"}, "ledger": {}})
    assert sub is not None
    outer = log.begin("search", "d2", sub[4])
    inner = log.begin("fetch", "d3", outer[4])
    log.record(inner, "page")
    log.record(outer, ["page"])
    after = log.begin("after", "d4", None)
    log.record(after, 1)

    kept, records = sub_run_part(log.to_records(), sub[4])

    assert kept["state"] == {"topic": "otters"}
    assert {r["name"]: r["parent"] for r in records} == {"search": None, "fetch": outer[4]}
    replay = ReplayLog()
    replay.load(records)
    served = replay.begin("search", "d2", None)
    assert isinstance(served, Served) and served.value == ["page"]
    assert not replay.replaying


class _HookedList(list):  # type: ignore[type-arg]
    """The log's ended calls, running ``before_append`` just before each append."""

    def __init__(self, before_append) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.before_append = before_append

    def append(self, item) -> None:  # type: ignore[no-untyped-def]
        self.before_append()
        super().append(item)


class _HookedRunning(dict):  # type: ignore[type-arg]
    """The log's calls in flight, running ``before_read`` when a checkpoint reads them."""

    def __init__(self, before_read) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.before_read = before_read

    def values(self):  # type: ignore[no-untyped-def]
        self.before_read()
        return super().values()


def test_a_checkpoint_taken_while_a_step_records_its_result_still_has_that_step() -> None:
    # Another thread takes the checkpoint at the worst moment of record(): the call is about
    # to move from the calls in flight to the ended ones. It must be in one of the two.
    log = ReplayLog()
    call = log.begin("fetch", "d1", parent=None)
    seen: list[list[dict]] = []  # type: ignore[type-arg]
    log._recorded = _HookedList(lambda: seen.append(log.to_records()))  # type: ignore[assignment]
    log.record(call, "page")  # type: ignore[arg-type]
    assert [r["name"] for r in seen[0]] == ["fetch"]
    assert [(r["name"], r.get("result")) for r in log.to_records()] == [("fetch", "page")]


def test_a_step_that_records_its_result_while_a_checkpoint_reads_the_log_is_in_it_once() -> None:
    # The other way round: the step ends between the checkpoint's two reads.
    log = ReplayLog()
    call = log.begin("fetch", "d1", parent=None)
    hooked = _HookedRunning(lambda: log.record(call, "page") if call[4] in hooked else None)  # type: ignore[index]
    hooked.update(log._running)
    log._running = hooked  # type: ignore[assignment]
    records = log.to_records()
    assert [(r["name"], r.get("result")) for r in records] == [("fetch", "page")]


def test_take_out_of_the_recorded_order_raises_as_a_served_step_would() -> None:
    def recorded(rec: ReplayLog) -> None:
        rec.record(rec.begin("ask", "d1", parent=None), "answer")  # type: ignore[arg-type]
        rec.record(rec.begin("plan", "d2", parent=None), "plan")  # type: ignore[arg-type]

    log = restored(recorded)
    with pytest.raises(DeterminismError, match="'plan' came before 'ask'"):
        log.take("plan", "d2", parent=None)


def test_take_a_call_that_is_due_serves_it_and_a_call_that_is_not_is_left_due() -> None:
    def recorded(rec: ReplayLog) -> None:
        rec.record(rec.begin("ask", "d1", parent=None), "answer")  # type: ignore[arg-type]
        rec.record(rec.begin("ask", "d1", parent=None), "second answer")  # type: ignore[arg-type]
        rec.fail(rec.begin("plan", "d2", parent=None))  # type: ignore[arg-type]

    log = restored(recorded)
    assert log.take("ask", "d1", parent=None) == (True, "answer")
    assert log.take("ask", "d1", parent=None) == (True, "second answer")  # the next one is due now
    assert log.take("plan", "d2", parent=None) == (False, None)  # it failed: nothing to serve
    call = log.begin("plan", "d2", parent=None)  # the program runs it: the recorded call, again
    assert isinstance(call, tuple)
    log.record(call, "planned")
    assert not log.replaying
