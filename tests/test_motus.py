"""Real Motus programs under MotusInstrumentor, offline.

No mock of Motus: its real runtime (background event loop, thread pool,
retries, timeouts, cancellation, ReActAgent, tools) runs programs of these
tests against a fake model, a subclass of Motus's ``BaseChatClient`` that
returns ``ChatCompletion`` objects with usage. ``motus_programs/research_crew.py``
knows nothing of multirun: the same file is run in process (spans to the
``traced`` fixture's in-memory exporter) and as a subprocess under
``opentelemetry-instrument`` (spans to multirun's local files), and both
give the same span tree.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import genai_prices
import pytest

from child_processes import environment_without_settings

pytestmark = pytest.mark.needs_py312
if sys.version_info < (3, 12):
    pytest.skip("Motus needs Python 3.12 or newer", allow_module_level=True)

import motus.runtime  # noqa: E402  (after the version check: Motus does not import before 3.12)
import wrapt  # noqa: E402
from motus.models import BaseChatClient, ChatCompletion  # noqa: E402
from motus.runtime import agent_task, cancel, resolve  # noqa: E402
from motus.runtime.task_instance import TaskCancelledError  # noqa: E402
from opentelemetry.sdk.trace import SpanProcessor  # noqa: E402
from opentelemetry.trace import StatusCode  # noqa: E402

import multirun  # noqa: E402
from multirun.cli.runs import Node, build_tree, find_runs, load_spans, record_from_span  # noqa: E402
from multirun.client import get_client  # noqa: E402
from multirun.context import get_current_agent_context  # noqa: E402
from multirun.errors import BudgetExceededError, PolicyViolation  # noqa: E402
from multirun.integrations import _options as integration_options  # noqa: E402
from multirun.integrations import motus as integration  # noqa: E402
from multirun.integrations.motus import MotusInstrumentor  # noqa: E402
from multirun.models import Budget, Policy, StepKind  # noqa: E402
from multirun.models.policy import (  # noqa: E402
    CircuitBreakerRule,
    DegradationTrigger,
    GracefulDegradationRule,
    RateLimitRule,
)
from multirun.telemetry import attributes as attr  # noqa: E402
from multirun.telemetry.local_files import SpanRecord  # noqa: E402
from test_gemini_usage import MODEL as GEMINI  # noqa: E402
from test_gemini_usage import gemini_server  # noqa: E402
from test_openai_usage import CANNED, llm  # noqa: E402
from test_openai_usage import instrumented as openai_traced  # noqa: E402

__all__ = ["gemini_server", "llm", "openai_traced"]  # fixtures, imported for pytest

PROGRAMS = Path(__file__).parent / "motus_programs"
GENEROUS = 30.0  # seconds: a wait far above any normal duration, that fails the test, not hangs it
ROOT = Path(__file__).resolve().parent.parent


def _load_program(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"motus_programs_{name}", PROGRAMS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def instrumented() -> Iterator[MotusInstrumentor]:
    instrumentor = MotusInstrumentor()
    instrumentor.instrument()
    yield instrumentor
    instrumentor.uninstrument()


@pytest.fixture
def runtime(instrumented: MotusInstrumentor) -> Iterator[None]:
    """A fresh Motus runtime per test (its own loop thread), shut down afterwards."""
    motus.runtime.shutdown()
    yield
    motus.runtime.shutdown()


@pytest.fixture(scope="module")
def crew() -> ModuleType:
    return _load_program("research_crew")


# ---------------------------------------------------------------------------
# helpers


def _records(traced: Any) -> list[SpanRecord]:
    return [record_from_span(s) for s in traced.spans()]


def _status(span: SpanRecord) -> str:
    for key in (attr.STEP_STATUS, attr.AGENT_STATUS, attr.RUN_STATUS):
        if key in span.attributes:
            return str(span.attributes[key])
    return "?"


def _shape(node: Node) -> tuple[Any, ...]:
    """A span tree as (name, status, sorted children): parallel siblings start in any order."""
    return (node.span.name, _status(node.span), tuple(sorted(_shape(child) for child in node.children)))


def _tree(spans: list[SpanRecord]) -> tuple[Any, ...]:
    runs = find_runs(spans)
    assert len(runs) == 1, [r.name for r in runs]
    return _shape(build_tree(spans, runs[0].span))


def _leaf(name: str, status: str = "completed") -> tuple[Any, ...]:
    return (name, status, ())


CHAT = "chat gpt-4o-mini"
CREW_TREE = (
    "invoke_workflow research_crew",
    "completed",
    (
        (
            "invoke_agent research_crew",
            "completed",
            tuple(
                sorted(
                    [
                        (
                            "invoke_agent researcher",
                            "completed",
                            tuple(sorted([_leaf(CHAT), _leaf(CHAT), _leaf("execute_tool web_search")])),
                        ),
                        ("invoke_agent writer", "completed", (_leaf(CHAT),)),
                        _leaf("step build_prompt"),
                        _leaf("step fetch_source"),
                        _leaf("step fetch_source"),
                        _leaf("step flaky_fetch"),
                        _leaf("step slow_extra", "cancelled"),
                        _leaf("step slow_lookup"),
                    ]
                )
            ),
        ),
    ),
)


def _one(spans: list[SpanRecord], name: str) -> SpanRecord:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, f"{name}: {[s.name for s in spans]}"
    return found[0]


def _exceptions(span: SpanRecord) -> list[dict[str, Any]]:
    return [e["attributes"] for e in span.events if e["name"] == "exception"]


# ---------------------------------------------------------------------------
# the research crew, in process


@pytest.fixture
def crew_spans(traced: Any, runtime: None, crew: ModuleType) -> list[SpanRecord]:
    report = crew.main()
    assert report.startswith("[gpt-4o-mini]")
    return _records(traced)


def test_crew_span_tree(crew_spans: list[SpanRecord]) -> None:
    assert _tree(crew_spans) == CREW_TREE
    assert len(crew_spans) == 14  # nothing else: no span for Motus's internal RESOLVE node


def test_kinds_and_parents_follow_the_task_types(crew_spans: list[SpanRecord]) -> None:
    by_id = {s.span_id: s for s in crew_spans}
    crew_agent = _one(crew_spans, "invoke_agent research_crew")
    researcher = _one(crew_spans, "invoke_agent researcher")
    assert crew_agent.attributes[attr.GEN_AI_AGENT_NAME] == "research_crew"
    assert by_id[crew_agent.parent_span_id].name == "invoke_workflow research_crew"
    assert by_id[researcher.parent_span_id] is crew_agent
    for chat in (s for s in crew_spans if s.name == CHAT):
        assert chat.attributes[attr.STEP_KIND] == "llm_call"
        assert chat.attributes[attr.GEN_AI_REQUEST_MODEL] == "gpt-4o-mini"
        assert chat.attributes[attr.STEP_NAME] == "model_serve_task"
        assert chat.attributes[attr.MOTUS_TASK_TYPE] == "model_call"
    tool = _one(crew_spans, "execute_tool web_search")
    assert tool.attributes[attr.STEP_KIND] == "tool_call"
    assert tool.attributes[attr.GEN_AI_TOOL_NAME] == "web_search"
    assert by_id[tool.parent_span_id] is researcher
    fetches = [s for s in crew_spans if s.name == "step fetch_source"]
    assert {s.attributes[attr.STEP_KIND] for s in fetches} == {"function"}
    assert all(by_id[s.parent_span_id] is crew_agent for s in fetches)
    assert len({s.trace_id for s in crew_spans}) == 1


def test_parallel_tasks_are_overlapping_siblings(crew_spans: list[SpanRecord]) -> None:
    first, second = sorted((s for s in crew_spans if s.name == "step fetch_source"), key=lambda s: s.start_ns)
    assert first.parent_span_id == second.parent_span_id
    # they overlap: the second started before the first ended (no wall-clock bound, which a
    # loaded machine can break)
    assert second.start_ns < first.end_ns and first.start_ns < second.end_ns


def test_dependencies_are_links_to_the_upstream_tasks(crew_spans: list[SpanRecord], traced: Any) -> None:
    prompt = traced.span("step build_prompt")
    upstream = {
        s.context.span_id: s.name
        for s in traced.spans()
        if s.name in ("step fetch_source", "step flaky_fetch", "step slow_lookup")
    }
    assert len(upstream) == 4
    assert {link.context.span_id for link in prompt.links} == set(upstream)
    assert {link.attributes[attr.STEP_NAME] for link in prompt.links} == {
        "fetch_source",
        "flaky_fetch",
        "slow_lookup",
    }
    assert sorted(prompt.attributes[attr.MOTUS_DEPENDS_ON]) == [
        "fetch_source",
        "flaky_fetch",
        "slow_lookup",
    ]
    researcher = traced.span("invoke_agent researcher")
    assert [link.context.span_id for link in researcher.links] == [prompt.context.span_id]
    writer = traced.span("invoke_agent writer")
    assert [link.context.span_id for link in writer.links] == [researcher.context.span_id]
    assert list(writer.attributes[attr.MOTUS_DEPENDS_ON]) == ["researcher"]
    # a dependency finished before its dependent started
    assert all(s.end_time <= prompt.start_time for s in traced.spans() if s.context.span_id in upstream)


def test_each_retried_attempt_is_visible_with_its_error(crew_spans: list[SpanRecord]) -> None:
    flaky = _one(crew_spans, "step flaky_fetch")
    assert flaky.attributes[attr.STEP_ATTEMPT] == 2
    assert flaky.status_code == StatusCode.UNSET.value
    [retried] = _exceptions(flaky)
    assert retried["exception.type"] == "ConnectionError"
    assert retried["exception.message"] == "connection reset by peer"
    assert retried[attr.STEP_ATTEMPT] == 1
    assert retried[attr.STEP_RETRY_DELAY] == pytest.approx(0.01)

    lookup = _one(crew_spans, "step slow_lookup")
    assert lookup.attributes[attr.STEP_ATTEMPT] == 2
    [timed_out] = _exceptions(lookup)
    assert timed_out["exception.type"] == "TimeoutError"
    assert "exceeded its timeout of 1s" in timed_out["exception.message"]
    assert timed_out[attr.STEP_ATTEMPT] == 1
    assert lookup.duration_s >= 1.0  # the timed-out attempt is inside the span


def test_cancelled_task_is_marked_cancelled(crew_spans: list[SpanRecord]) -> None:
    extra = _one(crew_spans, "step slow_extra")
    assert extra.attributes[attr.STEP_STATUS] == "cancelled"
    assert extra.status_code != StatusCode.ERROR.value  # cancelling is not a failure
    assert extra.duration_s < 15  # ended when cancelled, not when its 30 s sleep would have


def test_tokens_and_cost_of_model_calls_roll_up(crew_spans: list[SpanRecord], crew: ModuleType) -> None:
    chats = [s for s in crew_spans if s.name == CHAT]
    tool_turn = [c for c in chats if c.attributes[attr.GEN_AI_USAGE_OUTPUT_TOKENS] == 18]
    answers = [c for c in chats if c.attributes[attr.GEN_AI_USAGE_OUTPUT_TOKENS] == 40]
    assert len(tool_turn) == 1 and len(answers) == 2
    # Motus's prompt_tokens exclude cached input; the GenAI input_tokens include it
    assert tool_turn[0].attributes[attr.GEN_AI_USAGE_INPUT_TOKENS] == 120
    assert tool_turn[0].attributes[attr.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS] == 20
    assert all(c.attributes[attr.GEN_AI_USAGE_INPUT_TOKENS] == 200 for c in answers)
    assert all(c.attributes[attr.GEN_AI_RESPONSE_MODEL] == "gpt-4o-mini" for c in chats)
    assert all(c.attributes[attr.GEN_AI_USAGE_COST_AMOUNT] > 0 for c in chats)

    def tokens(name: str) -> int:
        return int(_one(crew_spans, name).attributes[attr.TOKENS_USED])

    assert tokens("invoke_agent researcher") == 138 + 240
    assert tokens("invoke_agent writer") == 240
    assert tokens("invoke_agent research_crew") == 138 + 240 + 240
    assert tokens("invoke_workflow research_crew") == 618
    run = _one(crew_spans, "invoke_workflow research_crew")
    assert run.attributes[attr.COST_USD] == pytest.approx(
        sum(c.attributes[attr.GEN_AI_USAGE_COST_AMOUNT] for c in chats)
    )
    assert run.attributes[attr.STEPS_USED] == 10  # every task but the two agents is a step


# ---------------------------------------------------------------------------
# budgets and policy


class CountingClient(BaseChatClient):
    """A fake model that answers every call with 240 tokens and remembers the models asked for."""

    def __init__(self) -> None:
        self.models: list[str] = []

    async def create(self, model, messages, tools=None, reasoning=None, **kwargs) -> ChatCompletion:  # type: ignore[no-untyped-def]
        self.models.append(model)
        await asyncio.sleep(0.05)  # the program registers all its tasks before the first answer
        return ChatCompletion(
            id=f"chatcmpl-{len(self.models)}",
            model=model,
            content=f"answer {len(self.models)}",
            usage={"prompt_tokens": 200, "completion_tokens": 40, "total_tokens": 240},
        )

    async def parse(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise NotImplementedError


@agent_task(task_type="model_call")
async def ask(client: BaseChatClient, model: str, previous: Any) -> ChatCompletion:
    """A model call of the program itself: its model is a positional argument."""
    from motus.models import ChatMessage

    text = previous.content if isinstance(previous, ChatCompletion) else str(previous)
    return await client.create(model, [ChatMessage.user_message(f"go on from: {text}")])


@agent_task
def publish(answer: ChatCompletion) -> str:
    return str(answer.content)


def _chain(client: CountingClient, model: str, calls: int) -> Any:
    future: Any = "start"
    for _ in range(calls):
        future = ask(client, model, future)
    return publish(future)


def test_budget_stops_the_program_before_the_next_task(traced: Any, runtime: None) -> None:
    client = CountingClient()

    @multirun.run(budget=Budget(max_tokens=400))
    def pipeline() -> str:
        return resolve(_chain(client, "gpt-4o-mini", 4))

    with pytest.raises(BudgetExceededError) as raised:
        pipeline()
    assert raised.value.limit == "max_tokens"
    assert len(client.models) == 2  # 240, then 480 >= 400: the third call never reached the model

    chats = traced.named("chat gpt-4o-mini")
    assert [c.attributes[attr.STEP_STATUS] for c in chats] == ["completed", "completed", "failed", "failed"]
    refused, waiting_chat = chats[2], chats[3]
    assert refused.attributes[attr.POLICY_DECISION] == "abort"
    assert refused.attributes[attr.BUDGET_EXCEEDED_LIMIT] == "max_tokens"
    # the tasks waiting for the refused one never ran either: short failed spans, same error
    waiting = [s for s in traced.spans() if s.attributes.get(attr.STEP_STATUS) == "failed"]
    assert {s.name for s in waiting} == {"chat gpt-4o-mini", "step publish"}
    assert all(s.attributes[attr.ERROR_TYPE].endswith("BudgetExceededError") for s in waiting)
    assert attr.BUDGET_EXCEEDED_LIMIT not in waiting_chat.attributes  # it was not refused: its input was
    run = traced.span("invoke_workflow pipeline")
    assert run.attributes[attr.RUN_STATUS] == "failed"
    assert run.attributes[attr.TOKENS_USED] == 480
    assert all(s.parent is not None for s in chats)
    assert {traced.parent_of(s).name for s in chats} == {"invoke_workflow pipeline"}


CHARGES: list[int] = []


@agent_task(retries=5)
def costly_flaky() -> str:
    """Charges 300 tokens to its step, then fails: each retry costs."""
    CHARGES.append(300)
    multirun.report_usage("gpt-4o-mini", input_tokens=250, output_tokens=50)
    raise ConnectionError("upstream down")


def test_no_retry_over_budget(traced: Any, runtime: None) -> None:
    CHARGES.clear()

    @multirun.run(budget=Budget(max_tokens=500))
    def job() -> str:
        return resolve(costly_flaky())

    with pytest.raises(BudgetExceededError):
        job()
    assert len(CHARGES) == 2  # 300 < 500: retried once; 600: the third attempt is refused
    step = traced.span("step costly_flaky")
    events = [dict(e.attributes or {}) for e in step.events if e.name == "exception"]
    assert [e.get(attr.STEP_ATTEMPT) for e in events[:2]] == [1, 2]  # the two attempts that ran
    assert events[2]["exception.type"].endswith("BudgetExceededError")  # then the refusal
    assert step.attributes[attr.TOKENS_USED] == 600  # charged once per report, to the step
    assert step.attributes[attr.ERROR_TYPE].endswith("BudgetExceededError")
    assert traced.span("invoke_workflow job").attributes[attr.TOKENS_USED] == 600


def test_no_retry_once_an_enclosing_runs_budget_is_spent(traced: Any, runtime: None) -> None:
    CHARGES.clear()

    @multirun.run(name="child")
    def child() -> str:
        return resolve(costly_flaky())

    @multirun.run(name="parent", budget=Budget(max_tokens=500))
    def parent() -> str:
        return child()

    with pytest.raises(BudgetExceededError) as raised:
        parent()
    assert len(CHARGES) == 2  # as when the budget is the task's own run's (test_no_retry_over_budget)
    assert raised.value.limit == "max_tokens"
    assert raised.value.run_id == traced.span("invoke_workflow parent").attributes[attr.RUN_ID]
    assert traced.span("invoke_workflow child").attributes[attr.TOKENS_USED] == 600


NEAR_THE_DEADLINE: list[str] = []


@agent_task(retries=1, retry_delay=30)
def slow_then_flaky() -> str:
    """Fails its first call after 4 s on the run's clock; Motus would retry it 30 s later."""
    NEAR_THE_DEADLINE.append("called")
    if len(NEAR_THE_DEADLINE) == 1:
        get_client().clock.now += 4  # type: ignore[attr-defined]  # the tests' FakeClock
        raise ConnectionError("upstream down")
    return "retried"


def test_no_retry_whose_delay_ends_past_the_deadline(traced: Any, runtime: None) -> None:
    """As a decorated step's backoff (test_retry_backoff_never_sleeps_past_the_run_deadline),
    on the run's clock: Motus sleeps its retry_delay in real time, which a fake clock never sees."""
    NEAR_THE_DEADLINE.clear()

    @multirun.run(budget=Budget(max_duration_seconds=5))
    def job() -> str:
        return str(resolve(slow_then_flaky()))

    began = time.monotonic()
    with pytest.raises(ConnectionError):
        job()
    assert time.monotonic() - began < 15  # Motus did not wait 30 s for a retry that would not be made
    assert NEAR_THE_DEADLINE == ["called"]
    step = record_from_span(traced.span("step slow_then_flaky"))
    assert step.attributes[attr.ERROR_TYPE] == "ConnectionError"
    assert step.attributes[attr.STEP_ATTEMPT] == 1
    assert [e for e in _exceptions(step) if attr.STEP_RETRY_DELAY in e] == []  # no retry announced


@agent_task(retries=1, retry_delay=30)
def failing_then_waiting() -> str:
    """Fails at once: Motus then waits 30 s before the retry, and the test cancels it then."""
    raise ConnectionError("upstream down")


class _RetryAnnounced(logging.Handler):
    """Set when Motus says it retries ``task``: it then sleeps its retry delay at once, on its
    loop thread, where a cancel from another thread lands after it (agent_runtime.py)."""

    def __init__(self, task: str) -> None:
        super().__init__(logging.WARNING)
        self.said = f"Task {task} failed (attempt 1/"
        self.announced = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.said in record.getMessage() and "retrying in" in record.getMessage():
            self.announced.set()


def test_a_task_cancelled_in_its_retry_delay_says_it_made_one_attempt(traced: Any, runtime: None) -> None:
    # waits for Motus, not a time: a sleep of 0.05 s let a loaded machine cancel the task before
    # Motus had its failure (no exception event), and one of 0.1 s read the spans before the
    # cancelled step had ended
    retrying = _RetryAnnounced("failing_then_waiting")
    step_ended = _when_ended(traced, "step failing_then_waiting")

    @multirun.run
    def job() -> None:
        future = failing_then_waiting()
        assert retrying.announced.wait(GENEROUS)
        motus.runtime.cancel(future)
        assert step_ended.wait(GENEROUS)

    motus_log = logging.getLogger("AgentRuntime")
    motus_log.addHandler(retrying)
    try:
        job()
    finally:
        motus_log.removeHandler(retrying)
    step = traced.span("step failing_then_waiting")
    assert step.attributes[attr.STEP_STATUS] == "cancelled"
    assert step.attributes[attr.STEP_ATTEMPT] == 1  # the retry never started
    [retried] = _exceptions(record_from_span(step))
    assert retried[attr.STEP_ATTEMPT] == 1


AGENTS_RUN: list[str] = []


@agent_task(task_type="agent_call")
def helper_agent() -> str:
    AGENTS_RUN.append("helper")
    return "done"


@pytest.mark.parametrize("budget_of", ["own run", "enclosing run"])
def test_an_agent_task_is_refused_once_a_budget_is_spent(traced: Any, runtime: None, budget_of: str) -> None:
    AGENTS_RUN.clear()
    spent = Budget(max_tokens=100)

    @multirun.run(name="child", budget=spent if budget_of == "own run" else None)
    def child() -> str:
        if budget_of == "own run":
            multirun.report_usage("gpt-4o-mini", input_tokens=150)
        return resolve(helper_agent())

    @multirun.run(name="parent", budget=spent if budget_of == "enclosing run" else None)
    def parent() -> str:
        if budget_of == "enclosing run":
            multirun.report_usage("gpt-4o-mini", input_tokens=150)
        return child()

    with pytest.raises(BudgetExceededError) as raised:
        parent()
    assert AGENTS_RUN == []
    spending = "child" if budget_of == "own run" else "parent"
    assert raised.value.run_id == traced.span(f"invoke_workflow {spending}").attributes[attr.RUN_ID]
    refused = traced.span("invoke_agent helper_agent")
    assert refused.attributes[attr.BUDGET_EXCEEDED_LIMIT] == "max_tokens"


FAILURES: list[str] = []


@agent_task
def fragile() -> str:
    FAILURES.append("called")
    raise ConnectionError("refused")


def test_open_circuit_refuses_the_task_through_its_future(traced: Any, runtime: None) -> None:
    FAILURES.clear()

    @multirun.run(policy=Policy(circuit_breaker=CircuitBreakerRule(failure_threshold=2)))
    def job() -> list[str]:
        outcomes = []
        for _ in range(3):
            try:
                resolve(fragile())
            except (ConnectionError, PolicyViolation) as error:
                outcomes.append(type(error).__name__)
        return outcomes

    assert job() == ["ConnectionError", "ConnectionError", "PolicyViolation"]
    assert len(FAILURES) == 2  # the third call never ran
    refused = traced.named("step fragile")[2]
    assert refused.attributes[attr.POLICY_DECISION] == "abort"
    assert refused.attributes[attr.POLICY_RULE] == "circuit_breaker"


def test_graceful_degradation_switches_the_model_motus_asks_for(traced: Any, runtime: None) -> None:
    client = CountingClient()
    policy = Policy(graceful_degradation=GracefulDegradationRule(fallback_model="gpt-4o-mini", threshold=40))

    @multirun.run(budget=Budget(max_tokens=1000), policy=policy)
    def job() -> str:
        return resolve(_chain(client, "gpt-4o", 4))

    job()
    assert client.models == ["gpt-4o", "gpt-4o", "gpt-4o-mini", "gpt-4o-mini"]  # from 48% of the budget
    chats = [s for s in traced.spans() if s.attributes.get(attr.STEP_KIND) == "llm_call"]
    assert [c.name for c in chats] == ["chat gpt-4o", "chat gpt-4o", "chat gpt-4o-mini", "chat gpt-4o-mini"]
    assert [c.attributes[attr.POLICY_DECISION] for c in chats][2:] == ["fallback", "fallback"]


def test_rate_limit_waits_before_the_model_call(traced: Any, runtime: None) -> None:
    client = CountingClient()

    @multirun.run(policy=Policy(rate_limit=RateLimitRule(requests_per_minute=60)))
    def job() -> str:
        return resolve(_chain(client, "gpt-4o-mini", 3))

    job()
    chats = traced.named("chat gpt-4o-mini")
    assert [c.attributes[attr.POLICY_DECISION] for c in chats] == ["proceed", "wait", "wait"]
    assert [c.attributes[attr.POLICY_WAIT_SECONDS] for c in chats[1:]] == [pytest.approx(1.0)] * 2
    assert traced.clock.sleeps == [pytest.approx(1.0)] * 2  # on the run's clock, inside the step


@agent_task(task_type="model_call", retries=2)
async def ask_once(client: BaseChatClient, model: str, prompt: str) -> ChatCompletion:
    """A model call that Motus would retry twice."""
    from motus.models import ChatMessage

    return await client.create(model, [ChatMessage.user_message(prompt)])


SYNC_ASKED: list[str] = []


@agent_task(task_type="model_call")
def ask_sync(model: str, prompt: str) -> str:
    """A blocking model call: it runs, and waits for its slot, in Motus's thread pool."""
    SYNC_ASKED.append(prompt)
    return prompt


PACED = Policy(
    rate_limit=RateLimitRule(requests_per_minute=60),  # one model call a second
    circuit_breaker=CircuitBreakerRule(failure_threshold=1, recovery_time_seconds=30),
)


def _calls_of(traced: Any, task: str) -> list[Any]:
    """The spans of the model calls of ``task``, in the order they started."""
    spans = [s for s in traced.named(CHAT) if s.attributes[attr.STEP_NAME] == task]
    return sorted(spans, key=lambda s: s.start_time)


def test_a_model_call_waiting_for_its_slot_is_refused_by_a_circuit_that_opened_meanwhile(
    traced: Any, runtime: None
) -> None:
    client = CountingClient()

    @multirun.run(policy=PACED)
    def job() -> None:
        agent_ctx = get_current_agent_context()

        async def meanwhile(seconds: float) -> None:
            traced.clock.now += seconds
            agent_ctx.start_step("ask_once").fail(ConnectionError("down"))  # its circuit opens

        resolve(ask_once(client, "gpt-4o-mini", "first"))  # the slot at 0 s
        traced.clock.async_sleep = meanwhile  # type: ignore[method-assign]
        resolve(ask_once(client, "gpt-4o-mini", "second"))  # waits for the slot at 1 s

    with pytest.raises(PolicyViolation, match="circuit"):
        job()
    assert client.models == ["gpt-4o-mini"]  # the second call never reached the model, nor was retried
    refused = _calls_of(traced, "ask_once")[1]
    assert refused.attributes[attr.POLICY_DECISION] == "abort"
    assert refused.attributes[attr.POLICY_RULE] == "circuit_breaker"
    assert refused.attributes[attr.STEP_STATUS] == "failed"


def test_a_model_call_cancelled_while_it_waits_gives_back_its_probe_and_its_slot(
    traced: Any, runtime: None
) -> None:
    client = CountingClient()
    waiting = threading.Event()

    async def hang(seconds: float) -> None:
        waiting.set()
        await asyncio.sleep(3600)  # a real wait, so that the cancellation lands in it

    @multirun.run(policy=PACED)
    def job() -> str:
        agent_ctx = get_current_agent_context()
        agent_ctx.start_step("ask_once").fail(ConnectionError("down"))  # its circuit opens
        traced.clock.now += 31  # half-open: the next call is its probe
        agent_ctx.start_step("warm", kind=StepKind.LLM_CALL, model="gpt-4o-mini").complete()  # slot at 31 s
        instant, traced.clock.async_sleep = traced.clock.async_sleep, hang  # type: ignore[method-assign]
        future = ask_once(client, "gpt-4o-mini", "cancelled")  # the probe, waiting for the slot at 32 s
        assert waiting.wait(5)
        cancel(future)
        with pytest.raises(TaskCancelledError):
            resolve(future)
        traced.clock.async_sleep = instant  # type: ignore[method-assign]
        return str(resolve(ask_once(client, "gpt-4o-mini", "after")).content)  # probe and slot are free

    assert job() == "answer 1"
    assert client.models == ["gpt-4o-mini"]
    cancelled, after = _calls_of(traced, "ask_once")
    assert cancelled.attributes[attr.STEP_STATUS] == "cancelled"
    assert after.attributes[attr.POLICY_WAIT_SECONDS] == 1.0  # the slot the cancelled call never used


PROBE_RUNS = threading.Event()


@agent_task
async def probe(hang: bool) -> str:
    if hang:
        PROBE_RUNS.set()
        await asyncio.sleep(30)
    return "ok"


def test_a_probe_cancelled_while_it_runs_gives_the_probe_back(traced: Any, runtime: None) -> None:
    @multirun.run(policy=PACED)
    def job() -> str:
        get_current_agent_context().start_step("probe").fail(ConnectionError("down"))  # its circuit opens
        traced.clock.now += 31  # half-open: the next call is its probe
        PROBE_RUNS.clear()
        future = probe(True)
        assert PROBE_RUNS.wait(10)  # cancelled while it runs, not before it starts
        cancel(future)
        with pytest.raises(TaskCancelledError):
            resolve(future)
        return str(resolve(probe(False)))  # a cancelled call says nothing of the dependency: this one probes

    assert job() == "ok"
    assert [s.attributes[attr.STEP_STATUS] for s in traced.named("step probe")] == [
        "failed",
        "cancelled",
        "completed",
    ]


def test_a_sync_model_call_cancelled_while_it_waits_does_not_run_and_gives_its_slot_back(
    traced: Any, runtime: None
) -> None:
    SYNC_ASKED.clear()
    waiting, go_on = threading.Event(), threading.Event()

    def held(seconds: float) -> None:
        waiting.set()
        go_on.wait(5)  # a thread's wait cannot be cancelled: it ends after the task was

    @multirun.run(policy=PACED)
    def job() -> str:
        resolve(ask_sync("gpt-4o-mini", "first"))  # the slot at 0 s
        instant, traced.clock.sleep = traced.clock.sleep, held  # type: ignore[method-assign]
        future = ask_sync("gpt-4o-mini", "cancelled")  # waits in its thread for the slot at 1 s
        assert waiting.wait(5)
        cancel(future)
        with pytest.raises(TaskCancelledError):
            resolve(future)
        go_on.set()
        traced.clock.sleep = instant  # type: ignore[method-assign]
        return str(resolve(ask_sync("gpt-4o-mini", "after")))

    assert job() == "after"
    time.sleep(0.2)  # the cancelled task's thread is done waiting by now
    assert SYNC_ASKED == ["first", "after"]  # the cancelled call did not run once its wait was over
    cancelled, after = _calls_of(traced, "ask_sync")[1:]
    assert cancelled.attributes[attr.STEP_STATUS] == "cancelled"
    assert after.attributes[attr.POLICY_WAIT_SECONDS] == 1.0


# ---------------------------------------------------------------------------
# Motus's retries ask the policy, as a decorated step's retries do


class FlakyClient(CountingClient):
    """Fails its first ``failures`` calls; remembers when, on the run's clock, each call reached it."""

    def __init__(self, clock: Any, failures: int = 1) -> None:
        super().__init__()
        self.clock, self.failures = clock, failures
        self.times: list[float] = []

    async def create(self, model, messages, tools=None, reasoning=None, **kwargs) -> ChatCompletion:  # type: ignore[no-untyped-def]
        self.times.append(self.clock.monotonic())
        if len(self.times) <= self.failures:
            self.models.append(model)
            raise ConnectionError("overloaded")
        return await super().create(model, messages, tools, reasoning, **kwargs)


DOWN_CALLS: list[str] = []


@agent_task(retries=5)
def always_down() -> str:
    DOWN_CALLS.append("called")
    raise ConnectionError("upstream down")


def test_failed_attempts_open_the_circuit_and_the_next_retry_is_refused(traced: Any, runtime: None) -> None:
    DOWN_CALLS.clear()

    @multirun.run(policy=Policy(circuit_breaker=CircuitBreakerRule(failure_threshold=2)))
    def job() -> str:
        return str(resolve(always_down()))

    with pytest.raises(PolicyViolation, match="circuit") as raised:
        job()
    assert isinstance(raised.value.__cause__, ConnectionError)  # the failure the retry was to follow
    assert DOWN_CALLS == ["called", "called"]  # Motus would have made six attempts
    step = record_from_span(traced.span("step always_down"))
    assert step.attributes[attr.STEP_ATTEMPT] == 2
    assert step.attributes[attr.STEP_STATUS] == "failed"
    assert step.attributes[attr.POLICY_DECISION] == "abort"
    assert step.attributes[attr.POLICY_RULE] == "circuit_breaker"
    assert step.attributes[attr.ERROR_TYPE].endswith("PolicyViolation")
    first, second = _exceptions(step)[:2]
    assert (first[attr.STEP_ATTEMPT], first["exception.type"], first[attr.STEP_RETRY_DELAY]) == (
        1,
        "ConnectionError",
        0.0,
    )
    assert (second[attr.STEP_ATTEMPT], second["exception.type"]) == (2, "ConnectionError")
    assert attr.STEP_RETRY_DELAY not in second  # refused: no retry followed it


PACED_ONLY = Policy(rate_limit=RateLimitRule(requests_per_minute=60))  # one model call a second


def test_a_retry_waits_for_its_rate_limit_slot(traced: Any, runtime: None) -> None:
    client = FlakyClient(traced.clock)
    start = traced.clock.now

    @multirun.run(policy=PACED_ONLY)
    def job() -> str:
        return str(resolve(ask_once(client, "gpt-4o-mini", "hello")).content)

    assert job() == "answer 2"
    assert client.times == [start, start + 1.0]  # the retry reached the model at its slot, a second later
    assert traced.clock.sleeps == [1.0]
    [call] = _calls_of(traced, "ask_once")
    assert call.attributes[attr.STEP_STATUS] == "completed"
    assert call.attributes[attr.STEP_ATTEMPT] == 2
    assert call.attributes[attr.POLICY_DECISION] == "wait"
    assert call.attributes[attr.POLICY_RULE] == "rate_limit"
    [retried] = _exceptions(record_from_span(call))
    assert retried["exception.type"] == "ConnectionError"
    assert retried[attr.STEP_RETRY_DELAY] == 1.0


def test_a_retry_of_a_degraded_run_asks_for_the_fallback_model(traced: Any, runtime: None) -> None:
    client = FlakyClient(traced.clock)
    degrade = GracefulDegradationRule(
        fallback_model="gpt-4o-mini", trigger=DegradationTrigger.CONSECUTIVE_FAILURES, threshold=1
    )

    @multirun.run(policy=Policy(graceful_degradation=degrade))
    def job() -> str:
        return str(resolve(ask_once(client, "gpt-4o", "hello")).model)

    assert job() == "gpt-4o-mini"
    assert client.models == ["gpt-4o", "gpt-4o-mini"]  # the failed call counted: the retry falls back
    [call] = traced.named("chat gpt-4o-mini")  # the model its last attempt asked for
    assert call.attributes[attr.POLICY_DECISION] == "fallback"
    assert call.attributes[attr.GEN_AI_REQUEST_MODEL] == "gpt-4o-mini"


@agent_task(task_type="model_call", timeout=1.0, retries=1)
async def ask_in_time(client: BaseChatClient, model: str, prompt: str) -> ChatCompletion:
    """A model call that Motus gives 1 s, and retries once (the retry, 0.05 s of the client's,
    has the rest: 0.2 s left a loaded machine too little)."""
    from motus.models import ChatMessage

    return await client.create(model, [ChatMessage.user_message(prompt)])


def _first_wait_outlasts_the_timeout(clock: Any) -> None:
    """Make the first async wait on ``clock`` a real one, that Motus's timeout cuts short."""
    instant = clock.async_sleep

    async def sleep(seconds: float) -> None:
        if not clock.sleeps:
            clock.sleeps.append(seconds)
            await asyncio.sleep(5)
        await instant(seconds)

    clock.async_sleep = sleep


def test_an_attempt_whose_timeout_ends_its_wait_never_ran_and_the_retry_waits_for_its_slot(
    traced: Any, runtime: None
) -> None:
    client = FlakyClient(traced.clock, failures=0)
    start = traced.clock.now
    # one failure opens the circuit: the attempt that timed out while it waited is no failed call
    paced = Policy(
        rate_limit=RateLimitRule(requests_per_minute=60),
        circuit_breaker=CircuitBreakerRule(failure_threshold=1),
    )

    @multirun.run(policy=paced)
    def job() -> str:
        get_current_agent_context().start_step("warm", kind=StepKind.LLM_CALL, model="gpt-4o-mini").complete()
        _first_wait_outlasts_the_timeout(traced.clock)
        return str(resolve(ask_in_time(client, "gpt-4o-mini", "hello")).content)

    assert job() == "answer 1"
    # the retry waited for the slot the first attempt gave back, a second after the warm call
    assert client.times == [start + 1.0]
    assert traced.clock.sleeps == [1.0, 1.0]
    [call] = _calls_of(traced, "ask_in_time")
    assert call.attributes[attr.STEP_STATUS] == "completed"
    assert call.attributes[attr.STEP_ATTEMPT] == 2
    [timed_out] = _exceptions(record_from_span(call))
    assert timed_out["exception.type"] == "TimeoutError"
    assert timed_out[attr.STEP_ATTEMPT] == 1
    assert timed_out[attr.STEP_RETRY_DELAY] == 1.0


def test_a_model_call_whose_timeout_ends_its_wait_is_no_failed_call_of_the_model(
    traced: Any, runtime: None
) -> None:
    client = FlakyClient(traced.clock, failures=0)
    policy = Policy(
        rate_limit=RateLimitRule(requests_per_minute=60),
        circuit_breaker=CircuitBreakerRule(failure_threshold=1),
        graceful_degradation=GracefulDegradationRule(
            fallback_model="gpt-4o-mini", trigger=DegradationTrigger.CONSECUTIVE_FAILURES, threshold=1
        ),
    )

    @multirun.run(policy=policy)
    def job() -> str:
        get_current_agent_context().start_step("warm", kind=StepKind.LLM_CALL, model="gpt-4o").complete()
        _first_wait_outlasts_the_timeout(traced.clock)
        with pytest.raises(TimeoutError):
            resolve(ask_in_time.policy(retries=0)(client, "gpt-4o", "cut short"))
        return str(resolve(ask_once(client, "gpt-4o", "next")).model)

    # neither the circuit nor the degradation trigger (one failure each) counted the call that never ran
    assert job() == "gpt-4o"
    assert client.models == ["gpt-4o"]
    assert traced.clock.sleeps == [1.0, 1.0]  # and the next call had its slot


SYNC_IN_TIME: list[float] = []


@agent_task(task_type="model_call", timeout=1.0, retries=1, retry_delay=1.0)
def ask_sync_in_time(model: str, prompt: str) -> str:
    """A blocking model call that Motus gives 1 s, and retries once 1 s later; it notes when, on
    the run's clock, it ran. (0.2 s and 0.5 s left a loaded machine too little of either.)"""
    SYNC_IN_TIME.append(get_client().clock.monotonic())
    return prompt


def test_a_sync_attempt_whose_timeout_ends_its_wait_does_not_run_when_its_thread_wakes(
    traced: Any, runtime: None
) -> None:
    SYNC_IN_TIME.clear()
    start = traced.clock.now
    woke = threading.Event()
    instant = traced.clock.sleep

    def sleep(seconds: float) -> None:
        if not traced.clock.sleeps:
            traced.clock.sleeps.append(seconds)
            time.sleep(1.5)  # a thread's wait is not cut short: it wakes in Motus's retry delay
            woke.set()
            return
        instant(seconds)

    @multirun.run(policy=PACED_ONLY)
    def job() -> str:
        get_current_agent_context().start_step("warm", kind=StepKind.LLM_CALL, model="gpt-4o-mini").complete()
        traced.clock.sleep = sleep  # type: ignore[method-assign]
        return str(resolve(ask_sync_in_time("gpt-4o-mini", "hello")))

    assert job() == "hello"
    assert woke.wait(GENEROUS)  # the first attempt's thread woke (late, on a loaded machine)
    assert [start + 1.0] == SYNC_IN_TIME  # once, the retry at its slot; not when the first attempt woke


def test_budget_of_instrument_applies_to_the_runs_it_starts(
    traced: Any, runtime: None, instrumented: MotusInstrumentor, crew: ModuleType
) -> None:
    from motus.agent import ReActAgent

    instrumented.uninstrument()
    instrumented.instrument(budget=Budget(max_tokens=100))
    try:
        solo = ReActAgent(
            client=crew.FakeChatClient(), model_name="gpt-4o-mini", name="solo", tools=[crew.web_search]
        )
        with pytest.raises(BudgetExceededError):
            resolve(solo("What is OpenTelemetry?"))
    finally:
        instrumented.uninstrument()
        instrumented.instrument()
    run = traced.span("invoke_workflow solo")
    assert run.attributes[attr.RUN_STATUS] == "failed"
    assert run.attributes["multirun.budget.max_tokens"] == 100
    assert traced.span("invoke_agent solo").attributes[attr.AGENT_STATUS] == "failed"
    assert traced.span("chat gpt-4o-mini").attributes[attr.STEP_STATUS] == "completed"  # 138 tokens
    tool = traced.span("execute_tool web_search")  # the next task: refused before it ran
    assert tool.attributes[attr.POLICY_DECISION] == "abort"
    assert tool.attributes[attr.BUDGET_EXCEEDED_LIMIT] == "max_tokens"


def test_a_budget_given_to_instrument_once_instrumented_applies(
    traced: Any, runtime: None, instrumented: MotusInstrumentor, crew: ModuleType
) -> None:
    """Under ``opentelemetry-instrument`` Motus is instrumented before the program starts: the
    budget the program then gives ``instrument()`` must still cap the runs it starts (it was
    dropped, with only OpenTelemetry's "already instrumented" warning)."""
    from motus.agent import ReActAgent

    assert instrumented.is_instrumented_by_opentelemetry
    try:
        instrumented.instrument(budget=Budget(max_tokens=100))
        solo = ReActAgent(
            client=crew.FakeChatClient(), model_name="gpt-4o-mini", name="solo", tools=[crew.web_search]
        )
        with pytest.raises(BudgetExceededError):
            resolve(solo("What is OpenTelemetry?"))
    finally:
        instrumented.uninstrument()
        instrumented.instrument()
    assert traced.span("invoke_workflow solo").attributes["multirun.budget.max_tokens"] == 100
    assert traced.span("execute_tool web_search").attributes[attr.BUDGET_EXCEEDED_LIMIT] == "max_tokens"


def test_a_refused_usage_report_fails_the_task_through_its_future(traced: Any, runtime: None) -> None:
    """With ``init(unpriced="fail")`` a model call of a model with no known price is refused."""
    traced.client.fail_unpriced = True
    client = CountingClient()

    @multirun.run
    def job() -> str:
        return resolve(_chain(client, "house-model-without-a-price", 1))

    with pytest.raises(PolicyViolation, match="no known price"):
        job()
    chat = traced.span("chat house-model-without-a-price")
    assert chat.attributes[attr.STEP_STATUS] == "failed"
    assert chat.attributes[attr.UNPRICED] is True
    assert chat.attributes[attr.TOKENS_USED] == 240  # counted all the same
    assert traced.span("step publish").attributes[attr.STEP_STATUS] == "failed"  # never ran


class SdkChatClient(BaseChatClient):
    """A chat client on ``openai.AsyncOpenAI`` (one non-streamed request), usage as Motus's OpenAI
    client reads it."""

    def __init__(self, base_url: str) -> None:
        import openai

        self.sdk = openai.AsyncOpenAI(base_url=base_url, api_key="test", max_retries=0)

    async def create(self, model, messages, tools=None, reasoning=None, **kwargs) -> ChatCompletion:  # type: ignore[no-untyped-def]
        from motus.models import OpenAIChatClient

        response = await self.sdk.chat.completions.create(
            model=model, messages=[{"role": m.role, "content": m.content} for m in messages]
        )
        return ChatCompletion(
            id=response.id,
            model=model,
            content=response.choices[0].message.content,
            usage=OpenAIChatClient._extract_usage(response),
        )

    async def parse(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise NotImplementedError


def test_a_model_call_the_openai_instrumentation_traced_too_is_charged_once(
    openai_traced: Any, llm: Any, runtime: None
) -> None:
    """A Motus chat client on the real ``openai`` SDK under opentelemetry-instrumentation-openai-v2:
    the SDK call's chat span charges the call, and the model_call step counts it in its roll-up,
    not a second time."""
    client = SdkChatClient(llm.url)

    @multirun.run
    def job() -> str:
        return resolve(_chain(client, "gpt-4o-mini", 1))

    assert job() == "re: go on from: start"
    canned = CANNED[0].prompt + CANNED[0].completion
    (step,) = [s for s in openai_traced.named("chat gpt-4o-mini") if attr.STEP_NAME in s.attributes]
    assert step.attributes[attr.TOKENS_USED] == canned
    assert attr.GEN_AI_USAGE_INPUT_TOKENS not in step.attributes  # the SDK span's, not its own
    assert openai_traced.span("invoke_workflow job").attributes[attr.TOKENS_USED] == canned


class NanCostClient(BaseChatClient):
    """A gateway that reports a cost it could not compute as NaN."""

    async def create(self, model, messages, tools=None, reasoning=None, **kwargs) -> ChatCompletion:  # type: ignore[no-untyped-def]
        usage = {"prompt_tokens": 200, "completion_tokens": 40, "total_tokens": 240, "cost": float("nan")}
        return ChatCompletion(id="chatcmpl-nan", model=model, content="answer", usage=usage)

    async def parse(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise NotImplementedError


def test_a_cost_the_provider_could_not_compute_is_priced_here(traced: Any, runtime: None) -> None:
    @multirun.run
    def job() -> str:
        return resolve(_chain(NanCostClient(), "gpt-4o-mini", 1))

    assert job() == "answer"
    chat = traced.span("chat gpt-4o-mini")  # ended, with its tokens
    assert chat.attributes[attr.STEP_STATUS] == "completed"
    assert chat.attributes[attr.TOKENS_USED] == 240
    assert chat.attributes[attr.GEN_AI_USAGE_COST_AMOUNT] > 0  # genai-prices' price
    assert traced.span("invoke_workflow job").attributes[attr.TOKENS_USED] == 240


class NoUsageClient(BaseChatClient):
    """A model (a local server, say) whose answers carry no token counts: Motus's usage is {}."""

    async def create(self, model, messages, tools=None, reasoning=None, **kwargs) -> ChatCompletion:  # type: ignore[no-untyped-def]
        return ChatCompletion(id="chatcmpl-quiet", model=model, content="quiet answer")

    async def parse(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise NotImplementedError


def test_a_model_call_whose_client_gives_no_usage_is_marked_unknown_not_a_silent_zero(
    traced: Any, runtime: None
) -> None:
    @multirun.run
    def job() -> str:
        return resolve(_chain(NoUsageClient(), "gpt-4o-mini", 1))

    assert job() == "quiet answer"
    chat = traced.span("chat gpt-4o-mini")
    assert chat.attributes[attr.STEP_STATUS] == "completed"
    assert chat.attributes[attr.USAGE_UNKNOWN] is True
    assert attr.USAGE_UNKNOWN not in traced.span("step publish").attributes  # no model call


@agent_task(task_type="model_call")
async def ask_the_sdk(base_url: str, model: str, prompt: str) -> Any:
    """A model call of the program's own that returns the ``openai`` SDK's response as it is."""
    import openai

    async with openai.AsyncOpenAI(base_url=base_url, api_key="test", max_retries=0) as sdk:
        return await sdk.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}])


def test_a_model_call_returning_an_sdk_response_is_charged_its_usage_not_marked_unknown(
    traced: Any, llm: Any, runtime: None
) -> None:
    """Its usage is the SDK response's (charged as a step's returned response is): the span and
    the run tree said "tokens unknown" beside the very tokens it was charged."""

    @multirun.run
    def job() -> str:
        return str(resolve(ask_the_sdk(llm.url, "gpt-4o-mini", "hello")).choices[0].message.content)

    assert job() == "re: hello"
    chat = traced.span("chat gpt-4o-mini")
    assert chat.attributes[attr.TOKENS_USED] == CANNED[0].prompt + CANNED[0].completion
    assert attr.USAGE_UNKNOWN not in chat.attributes
    assert traced.span("invoke_workflow job").attributes[attr.TOKENS_USED] == CANNED[0].tokens


def test_a_gemini_model_calls_thinking_is_counted_as_output(
    traced: Any, gemini_server: Any, runtime: None
) -> None:
    """Motus's Gemini client keeps the prompt and answer counts of a response and drops its
    thinking (``thoughtsTokenCount``), which Gemini bills as output; its ``total_tokens`` keeps
    it. The call was counted 1040 tokens of the 1100 the response says, as the same response a
    step returns is not (tests/test_gemini_usage.py)."""
    from motus.models import GeminiChatClient

    client = GeminiChatClient(api_key="test", http_options={"base_url": gemini_server.url})

    @multirun.run
    def job() -> str:
        return resolve(_chain(client, GEMINI, 1))

    assert job() == "ok"
    chat = traced.span(f"chat {GEMINI}")
    assert chat.attributes[attr.GEN_AI_USAGE_INPUT_TOKENS] == 1000
    assert chat.attributes[attr.GEN_AI_USAGE_OUTPUT_TOKENS] == 100  # the answer's 40, the thinking's 60
    assert chat.attributes[attr.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS] == 60
    thinking_billed = genai_prices.Usage(input_tokens=1000, output_tokens=100)  # Motus drops the cached count
    price = genai_prices.calc_price(thinking_billed, GEMINI, provider_id="google").total_price
    assert chat.attributes[attr.GEN_AI_USAGE_COST_AMOUNT] == pytest.approx(float(price))
    assert traced.span("invoke_workflow job").attributes[attr.TOKENS_USED] == 1100


def test_a_failure_reading_the_usage_still_ends_the_model_call(
    traced: Any, runtime: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any) -> Any:
        raise RuntimeError("instrumentation bug")

    monkeypatch.setattr(integration, "_usage_of", broken)

    @multirun.run
    def job() -> str:
        return resolve(_chain(CountingClient(), "gpt-4o-mini", 1))

    assert job() == "answer 1"
    assert traced.span("chat gpt-4o-mini").attributes[attr.STEP_STATUS] == "completed"


class GatedClient(BaseChatClient):
    """A fake model that answers (240 tokens) only once the test opens the gate."""

    def __init__(self) -> None:
        self.gate = threading.Event()

    async def create(self, model, messages, tools=None, reasoning=None, **kwargs) -> ChatCompletion:  # type: ignore[no-untyped-def]
        await asyncio.to_thread(self.gate.wait, 10)
        usage = {"prompt_tokens": 200, "completion_tokens": 40, "total_tokens": 240}
        return ChatCompletion(id="chatcmpl-late", model=model, content="late answer", usage=usage)

    async def parse(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise NotImplementedError


def test_a_model_call_ending_after_its_sub_run_is_charged_to_the_parent_run(
    traced: Any, runtime: None
) -> None:
    client = GatedClient()
    futures: list[Any] = []

    @multirun.run
    def sub() -> None:
        futures.append(ask(client, "gpt-4o-mini", "start"))  # not resolved here

    @multirun.run
    def main() -> str:
        sub()
        client.gate.set()  # the sub-run has ended: now the model answers
        return str(resolve(futures[0]).content)

    assert main() == "late answer"
    assert traced.span("invoke_workflow sub").attributes[attr.TOKENS_USED] == 0
    assert traced.span("chat gpt-4o-mini").attributes[attr.TOKENS_USED] == 240
    assert traced.span("invoke_workflow main").attributes[attr.TOKENS_USED] == 240


def test_a_model_call_ending_after_every_run_around_it_ended_is_reported_in_a_warning(
    traced: Any, runtime: None, caplog: pytest.LogCaptureFixture
) -> None:
    client = GatedClient()
    futures: list[Any] = []

    @multirun.run
    def job() -> None:
        futures.append(ask(client, "gpt-4o-mini", "start"))  # not resolved here

    job()
    client.gate.set()
    assert resolve(futures[0]).content == "late answer"  # never an error
    assert traced.span("invoke_workflow job").attributes[attr.TOKENS_USED] == 0
    assert traced.span("chat gpt-4o-mini").attributes[attr.TOKENS_USED] == 240
    late = [r.getMessage() for r in caplog.records if "after" in r.getMessage()]
    assert len(late) == 1 and "'job'" in late[0] and "240 tokens" in late[0]


@agent_task(task_type="agent_call")
async def gated_agent(client: BaseChatClient, fail: bool) -> str:
    """An agent whose one model call answers when the test opens the gate; fails after it if told."""
    answer = await ask(client, "gpt-4o-mini", "start")
    if fail:
        raise ValueError("the agent rejects the answer")
    return str(answer.content)


@pytest.mark.parametrize(("fail", "status"), [(False, "completed"), (True, "failed")])
def test_an_agent_task_still_running_when_its_run_ends_ends_with_its_task(
    traced: Any, runtime: None, fail: bool, status: str
) -> None:
    """The run's end does not end the agent of a task Motus still runs: it ends when its task
    settles, with that outcome and the tokens of its steps."""
    client = GatedClient()
    futures: list[Any] = []
    agent_ended = _when_ended(traced, "invoke_agent gated_agent")

    @multirun.run
    def job() -> None:
        futures.append(gated_agent(client, fail))  # not resolved here

    job()
    assert traced.span("invoke_workflow job").attributes[attr.RUN_STATUS] == "completed"
    assert not agent_ended.is_set()  # its task runs on
    client.gate.set()
    if fail:
        with pytest.raises(ValueError, match="rejects"):
            resolve(futures[0])
    else:
        assert resolve(futures[0]) == "late answer"
    assert agent_ended.wait(5)
    agent = traced.span("invoke_agent gated_agent")
    assert agent.attributes[attr.AGENT_STATUS] == status
    assert agent.attributes[attr.TOKENS_USED] == 240
    assert agent.attributes[attr.MOTUS_TASK_TYPE] == "agent_call"
    assert agent.end_time >= traced.span("chat gpt-4o-mini").end_time


class OutlivesItsFuture:
    """Gates of a blocking task that the test cancels or lets time out while its thread runs on."""

    started = threading.Event()  # the task's thread is in its body
    release = threading.Event()  # the test lets it go on: it spends tokens and calls a task


@pytest.fixture
def outliving() -> Iterator[type[OutlivesItsFuture]]:
    OutlivesItsFuture.started.clear()
    OutlivesItsFuture.release.clear()
    yield OutlivesItsFuture
    OutlivesItsFuture.release.set()  # a test that failed half-way leaves no thread waiting


@agent_task
def double(value: int) -> int:
    return value * 2


@agent_task(timeout=10)  # the test shortens it with .policy(timeout=...)
def outlives_its_future(value: int) -> int:
    """A blocking task: Motus stops waiting for it (cancelled, timed out), its thread cannot be
    stopped and goes on: it spends 240 tokens and calls another task after its future settled."""
    OutlivesItsFuture.started.set()
    assert OutlivesItsFuture.release.wait(10)
    multirun.report_usage("gpt-4o-mini", input_tokens=200, output_tokens=40)
    return int(resolve(double(value)))


def _when_ended(traced: Any, name: str, times: int = 1) -> threading.Event:
    """An event set when ``times`` spans ``name`` have ended."""
    from opentelemetry.sdk.trace import SpanProcessor

    ended = threading.Event()
    seen: list[str] = []

    class Watch(SpanProcessor):
        def on_end(self, span: Any) -> None:
            if span.name == name:
                seen.append(name)
                if len(seen) == times:
                    ended.set()

    traced.provider.add_span_processor(Watch())
    return ended


def _late_thread_spans(traced: Any) -> tuple[Any, Any]:
    """The step of ``outlives_its_future`` and of the task its thread called after it settled."""
    step, called = traced.span("step outlives_its_future"), traced.span("step double")
    assert traced.parent_of(called) is step
    assert step.start_time < called.start_time and called.end_time <= step.end_time
    return step, called


def test_a_cancelled_sync_task_whose_thread_outlives_its_run_keeps_its_step_until_the_thread_returns(
    traced: Any, runtime: None, outliving: type[OutlivesItsFuture], caplog: pytest.LogCaptureFixture
) -> None:
    step_ended = _when_ended(traced, "step outlives_its_future")

    @multirun.run
    def job() -> str:
        future = outlives_its_future(21)
        assert outliving.started.wait(5)
        cancel(future)
        with pytest.raises(TaskCancelledError):
            resolve(future)
        return "moved on"

    assert job() == "moved on"  # the run ended; the cancelled task's thread still runs
    assert not step_ended.is_set()  # what the thread still does is the step's
    outliving.release.set()
    assert step_ended.wait(5)
    step, _ = _late_thread_spans(traced)
    assert step.attributes[attr.STEP_STATUS] == "cancelled"
    assert step.attributes[attr.TOKENS_USED] == 240  # on its span, as the warning says
    assert traced.span("invoke_workflow job").attributes[attr.TOKENS_USED] == 0
    late = [r.getMessage() for r in caplog.records if "after run" in r.getMessage()]
    assert len(late) == 1 and "240 tokens" in late[0] and "'outlives_its_future'" in late[0]


def test_a_timed_out_sync_task_whose_thread_runs_on_charges_its_step_and_the_run_that_moved_on(
    traced: Any, runtime: None, outliving: type[OutlivesItsFuture]
) -> None:
    step_ended = _when_ended(traced, "step outlives_its_future")

    @multirun.run
    def job() -> str:
        with pytest.raises(TimeoutError):
            resolve(outlives_its_future.policy(timeout=0.1)(21))
        assert not step_ended.is_set()  # its thread still runs
        outliving.release.set()
        assert step_ended.wait(5)
        return "moved on"

    assert job() == "moved on"
    step, called = _late_thread_spans(traced)
    assert step.attributes[attr.STEP_STATUS] == "failed"
    assert step.attributes[attr.ERROR_TYPE] == "TimeoutError"
    assert step.attributes[attr.TOKENS_USED] == 240
    assert traced.span("invoke_workflow job").attributes[attr.TOKENS_USED] == 240  # no token on no span
    assert called.attributes[attr.STEP_STATUS] == "completed"


def test_a_timed_out_sync_task_counts_towards_the_circuit_at_once_though_its_thread_runs_on(
    traced: Any, runtime: None, outliving: type[OutlivesItsFuture]
) -> None:
    both_ended = _when_ended(traced, "step outlives_its_future", times=2)

    @multirun.run(policy=Policy(circuit_breaker=CircuitBreakerRule(failure_threshold=1)))
    def job() -> None:
        with pytest.raises(TimeoutError):
            resolve(outlives_its_future.policy(timeout=0.1)(21))
        with pytest.raises(PolicyViolation, match="circuit"):  # while the first one's thread runs
            resolve(outlives_its_future(21))
        outliving.release.set()
        assert both_ended.wait(5)

    job()
    timed_out, refused = sorted(traced.named("step outlives_its_future"), key=lambda s: s.start_time)
    assert timed_out.attributes[attr.ERROR_TYPE] == "TimeoutError"
    assert refused.attributes[attr.POLICY_DECISION] == "abort"


# ---------------------------------------------------------------------------
# failures


@agent_task
def broken_source() -> str:
    raise ValueError("bad data")


@agent_task
def consume(value: str) -> str:
    return value.upper()


def test_a_task_whose_input_failed_has_a_short_failed_span(traced: Any, runtime: None) -> None:
    @multirun.run
    def job() -> str:
        return resolve(consume(broken_source()))

    with pytest.raises(ValueError, match="bad data"):
        job()
    source = traced.span("step broken_source")
    waiting = traced.span("step consume")
    for span in (source, waiting):
        assert span.attributes[attr.STEP_STATUS] == "failed"
        assert span.attributes[attr.ERROR_TYPE] == "ValueError"
        assert span.status.status_code is StatusCode.ERROR
    assert waiting.start_time >= source.end_time
    assert traced.parent_of(waiting).name == "invoke_workflow job"


SLOW_SYNC: list[float] = []


@agent_task(timeout=1.0, retries=1)
def slow_sync() -> str:
    """A blocking task: its first attempt outlives Motus's timeout (its thread cannot be stopped)
    by a second, and the retry has a second (0.2 s and 0.4 s left a loaded machine too little)."""
    SLOW_SYNC.append(time.monotonic())
    if len(SLOW_SYNC) == 1:
        time.sleep(2.0)
        return "late"
    return "in time"


def test_a_sync_attempt_that_timed_out_is_retried_and_its_late_end_ignored(
    traced: Any, runtime: None
) -> None:
    SLOW_SYNC.clear()
    step_ended = _when_ended(traced, "step slow_sync")

    @multirun.run
    def job() -> str:
        return resolve(slow_sync())

    assert job() == "in time"
    assert step_ended.wait(GENEROUS)  # when the first attempt's thread returned, after the task's result
    step = traced.span("step slow_sync")
    assert step.attributes[attr.STEP_STATUS] == "completed"
    assert step.attributes[attr.STEP_ATTEMPT] == 2
    [timed_out] = [e for e in step.events if e.name == "exception"]
    assert timed_out.attributes["exception.type"] == "TimeoutError"
    assert len(traced.spans()) == 2


class WorkersBusy:
    """Motus's worker threads, all held by the test, and the attempts Motus begins meanwhile."""

    held = threading.Semaphore(0)  # released once by each holder in a worker thread
    free = threading.Event()  # the test lets the holders return
    retried = threading.Event()  # Motus began the second attempt of queued_past_its_timeout
    attempts = 0


@agent_task
def hold_a_worker() -> None:
    WorkersBusy.held.release()
    assert WorkersBusy.free.wait(10)


def _motus_begins_an_attempt(event: Any) -> None:
    WorkersBusy.attempts += 1
    if WorkersBusy.attempts == 2:
        WorkersBusy.retried.set()


@agent_task(timeout=0.5, retries=1, on_start=_motus_begins_an_attempt)
def queued_past_its_timeout() -> str:
    return "ran"


def test_a_sync_attempt_whose_timeout_ends_while_it_waits_for_a_worker_thread_is_a_failed_attempt(
    traced: Any, runtime: None
) -> None:
    """Motus's timeout counts from when it hands the attempt to its thread pool: with every
    worker busy, the first attempt never runs, and Motus retries its TimeoutError."""
    WorkersBusy.attempts = 0
    WorkersBusy.free.clear()
    WorkersBusy.retried.clear()
    workers = motus.runtime.get_runtime().scheduler._executor._max_workers

    # one failure would open the circuit: the attempt that never ran is no failed call
    @multirun.run(policy=Policy(circuit_breaker=CircuitBreakerRule(failure_threshold=1)))
    def job() -> str:
        holders = [hold_a_worker() for _ in range(workers)]
        try:
            for _ in holders:
                assert WorkersBusy.held.acquire(timeout=5)
            future = queued_past_its_timeout()
            assert WorkersBusy.retried.wait(5)  # the first attempt timed out in the queue
        finally:
            WorkersBusy.free.set()
        return str(resolve(future))

    assert job() == "ran"
    step = record_from_span(traced.span("step queued_past_its_timeout"))
    assert step.attributes[attr.STEP_STATUS] == "completed"
    assert step.attributes[attr.STEP_ATTEMPT] == 2
    [timed_out] = _exceptions(step)
    assert (timed_out["exception.type"], timed_out[attr.STEP_ATTEMPT]) == ("TimeoutError", 1)


@agent_task
async def endless() -> str:
    await asyncio.sleep(30)
    return "never"


def test_shutting_motus_down_ends_the_spans_of_running_tasks(traced: Any, runtime: None) -> None:
    future = endless()
    time.sleep(0.1)
    motus.runtime.shutdown()
    with pytest.raises(RuntimeError, match="shutting down"):
        resolve(future)
    step = traced.span("step endless")
    assert step.attributes[attr.STEP_STATUS] == "failed"
    assert step.attributes[attr.ERROR_TYPE] == "RuntimeError"
    assert traced.span("invoke_workflow endless").attributes[attr.RUN_STATUS] == "failed"


def test_a_task_completing_as_motus_shuts_down_is_no_failure_of_its_step(traced: Any, runtime: None) -> None:
    """shutdown() on the program's thread ends the steps of the running tasks while one of them
    completes on Motus's loop thread: that step completed, and no failure of it counts towards
    the circuit (a later call is not refused)."""
    go, completed = threading.Event(), threading.Event()

    class Interleave(SpanProcessor):
        """Holds the shutdown, as it ends the first task's step, until the second has completed."""

        def on_end(self, span: Any) -> None:
            if span.name == "step endless":
                go.set()
                assert completed.wait(5)
            elif span.name == "step when_set":
                completed.set()

    traced.provider.add_span_processor(Interleave())
    breaker = Policy(circuit_breaker=CircuitBreakerRule(failure_threshold=1, recovery_time_seconds=30))

    @multirun.run(policy=breaker)
    def job() -> list[str]:
        first, second = endless(), when_set(go, "done")
        time.sleep(0.1)  # both running
        motus.runtime.shutdown()
        with pytest.raises(RuntimeError, match="shutting down"):
            resolve(first)
        return [resolve(second), resolve(when_set(go, "again"))]

    assert job() == ["done", "again"]
    assert [s.attributes[attr.STEP_STATUS] for s in traced.named("step when_set")] == ["completed"] * 2


def test_a_task_waiting_for_its_input_when_motus_shuts_down_fails_with_the_shutdown(
    traced: Any, runtime: None
) -> None:
    """Its future raises the shutdown's RuntimeError: its step says so, under its run, at the
    shutdown; nobody cancelled it, and Motus's own clean-up after the shutdown adds no span."""

    @multirun.run
    def job() -> None:
        waiting = consume(endless())
        time.sleep(0.1)
        motus.runtime.shutdown()
        with pytest.raises(RuntimeError, match="shutting down"):
            resolve(waiting)

    job()
    time.sleep(0.3)  # what Motus's loop still does after the shutdown
    run = traced.span("invoke_workflow job")
    step = traced.span("step consume")
    assert step.attributes[attr.STEP_STATUS] == "failed"
    assert step.attributes[attr.ERROR_TYPE] == "RuntimeError"
    assert traced.parent_of(step) is run
    assert step.end_time <= run.end_time


async def test_on_the_callers_event_loop_too(traced: Any, runtime: None) -> None:
    """Inside a running event loop Motus runs its tasks on that loop (its single-loop mode)."""

    @multirun.run
    async def job() -> list[str]:
        first, second = consume("a"), consume("b")
        return [await first, await second, await consume(first)]

    assert await job() == ["A", "B", "A"]
    assert motus.runtime.get_runtime()._owns_loop is False
    run = traced.span("invoke_workflow job")
    steps = sorted(traced.named("step consume"), key=lambda s: s.attributes[attr.MOTUS_TASK_ID])
    assert len(steps) == 3
    assert all(traced.parent_of(s) is run for s in steps)
    first, _, third = steps
    assert [link.context.span_id for link in third.links] == [first.context.span_id]


def test_tasks_registered_outside_any_run_start_their_own(traced: Any, runtime: None) -> None:
    assert resolve(consume("hello")) == "HELLO"
    run = traced.span("invoke_workflow consume")
    step = traced.span("step consume")
    assert traced.parent_of(step) is run
    assert run.attributes[attr.RUN_STATUS] == "completed"
    assert run.attributes[attr.STEPS_USED] == 1


def test_an_instrumentation_failure_costs_a_log_line_not_the_task(
    traced: Any, runtime: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("instrumentation bug")

    monkeypatch.setattr(integration._TaskTrace, "open", broken)
    monkeypatch.setattr(integration_options, "_warned", set())
    assert resolve(consume(consume("ok"))) == "OK"
    assert not [s for s in traced.spans() if s.name == "step consume"]
    assert any("the task goes on untraced" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------
# instrument, uninstrument, import


def test_uninstrument_restores_motus(traced: Any, runtime: None, instrumented: MotusInstrumentor) -> None:
    from motus.runtime import agent_runtime

    instrumented.uninstrument()
    try:
        submit = agent_runtime.AgentRuntime.__dict__["submit_task_registration"]
        assert not isinstance(submit, wrapt.BaseObjectProxy)
        assert not isinstance(agent_runtime.GraphScheduler.__dict__["_execute_task"], wrapt.BaseObjectProxy)
        assert resolve(consume("plain")) == "PLAIN"
        assert traced.spans() == []
    finally:
        instrumented.instrument()
    assert isinstance(agent_runtime.GraphScheduler.__dict__["_execute_task"], wrapt.BaseObjectProxy)
    assert resolve(consume("traced")) == "TRACED"
    assert [s.name for s in traced.spans()] == ["step consume", "invoke_workflow consume"]


def test_a_task_registered_through_a_name_bound_before_instrumenting_is_traced(
    traced: Any, runtime: None, instrumented: MotusInstrumentor
) -> None:
    """``from motus.runtime import register_agent_task`` above the ``instrument()`` call binds
    Motus's own function: its tasks are traced all the same (they ran untraced, with no word)."""
    instrumented.uninstrument()
    try:
        from motus.runtime import register_agent_task  # as a program does before instrumenting
    finally:
        instrumented.instrument()

    def shout(value: str) -> str:  # a plain function, registered as a task directly
        return value.upper()

    @multirun.run
    def job() -> str:
        return resolve(register_agent_task(shout, "direct"))

    assert job() == "DIRECT"
    step = traced.span("step shout")
    assert traced.parent_of(step) is traced.span("invoke_workflow job")


GATE = threading.Event()


@agent_task
def gated(value: str) -> str:
    assert GATE.wait(30)
    return value


def test_instrumenting_while_a_task_registered_before_runs_traces_only_the_tasks_registered_after(
    traced: Any, runtime: None, instrumented: MotusInstrumentor
) -> None:
    """A program instrumented late: the task it registered before goes on untraced, the task
    waiting for it is a step (with no link: its input has no span), and nothing breaks."""
    GATE.clear()
    instrumented.uninstrument()
    try:
        early = gated("early")  # running on Motus's loop thread, registered before instrumenting
    finally:
        instrumented.instrument()
    late = consume(early)
    GATE.set()
    assert resolve(late) == "EARLY"
    assert [s.name for s in traced.spans()] == ["step consume", "invoke_workflow consume"]
    step = traced.span("step consume")
    assert not step.links and attr.MOTUS_DEPENDS_ON not in step.attributes


def _python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )


def test_instrumenting_does_not_import_motus_and_patches_it_on_import() -> None:
    code = """
import sys
import wrapt
import multirun
from multirun.integrations.motus import MotusInstrumentor
MotusInstrumentor().instrument()
assert not [m for m in sys.modules if m.split(".")[0] == "motus"], "motus imported too early"
import motus.runtime
from motus.runtime import agent_runtime
assert isinstance(agent_runtime.AgentRuntime.__dict__["submit_task_registration"], wrapt.BaseObjectProxy)
assert isinstance(agent_runtime.GraphScheduler.__dict__["_resolve_task"], wrapt.BaseObjectProxy)
print("ok")
"""
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


FUTURE_MOTUS = """
import logging, sys
import wrapt
logging.basicConfig(format="%(levelname)s %(message)s")
from multirun.integrations.motus import MotusInstrumentor
if sys.argv[1] == "imported":
    import motus.runtime
MotusInstrumentor().instrument()
from motus.runtime import agent_runtime, agent_task, resolve

@agent_task
def shout(text: str) -> str:
    return text.upper()

print(resolve(shout("hello")))
print(isinstance(agent_runtime.AgentRuntime.__dict__["submit_task_registration"], wrapt.BaseObjectProxy))
MotusInstrumentor().uninstrument()
MotusInstrumentor().instrument()
"""


@pytest.mark.parametrize("when", ["imported", "not imported"])
def test_a_motus_whose_patched_method_was_renamed_runs_untraced_with_one_warning_naming_it(
    tmp_path: Path, when: str
) -> None:
    """A future Motus renames ``GraphScheduler._execute_task``: instrumenting it (Motus imported
    already or not yet) patches nothing, half a patch being worse than none, and one warning says
    what is missing; the program runs as it would uninstrumented (it failed with an error raised
    from ``instrument()``, or ran half patched)."""
    future = tmp_path / "motus"
    shutil.copytree(Path(motus.__file__).parent, future, ignore=shutil.ignore_patterns("__pycache__"))
    runtime = future / "runtime" / "agent_runtime.py"
    runtime.write_text(runtime.read_text().replace("_execute_task", "_run_task"))
    env = environment_without_settings()
    env.update(
        PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT / "src")]), MULTIRUN_DIR=str(tmp_path / "mr")
    )
    done = subprocess.run(
        [sys.executable, "-c", FUTURE_MOTUS, when], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["HELLO", "False"]
    [warning] = done.stderr.splitlines()
    assert warning.startswith("WARNING multirun: Motus") and "GraphScheduler._execute_task" in warning
    assert not (tmp_path / "mr" / "traces").exists()


# ---------------------------------------------------------------------------
# zero code: the same program under opentelemetry-instrument


def test_zero_code_run_gives_the_same_tree(tmp_path: Path, crew_spans: list[SpanRecord]) -> None:
    in_process = _tree(crew_spans)
    assert in_process == CREW_TREE
    env = {
        **environment_without_settings(),
        "MULTIRUN_DIR": str(tmp_path / ".multirun"),
        "MOTUS_LOG_LEVEL": "WARNING",
        # Motus's token estimate tries to download tiktoken's tables: offline, that makes HTTP
        # spans of the requests instrumentation that depend on the machine's cache, not on Motus
        "OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "requests,urllib3",
    }
    instrument = Path(sys.executable).with_name("opentelemetry-instrument")
    done = subprocess.run(
        [str(instrument), sys.executable, str(PROGRAMS / "research_crew.py")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("[gpt-4o-mini]")
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    spans = load_spans(tmp_path / ".multirun")
    assert _tree(spans) == in_process
    # the same attributes where they do not depend on time or ids
    for name in (CHAT, "step flaky_fetch", "step slow_extra", "invoke_workflow research_crew"):
        ours = sorted(_one(crew_spans, name).attributes) if name != CHAT else None
        theirs = [s for s in spans if s.name == name]
        assert theirs, name
        if ours is not None:
            assert sorted(theirs[0].attributes) == ours
    run = _one(spans, "invoke_workflow research_crew")
    assert run.attributes[attr.TOKENS_USED] == 618


# ---------------------------------------------------------------------------
# a run's end racing the tasks it registered: each interleaving made certain by gates


class HoldSpanStart(SpanProcessor):
    """A span processor of the program's that holds the start of the spans named ``name`` on
    Motus's loop thread until ``release`` is set; ``starting`` is set as one starts."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.starting = threading.Event()
        self.release = threading.Event()

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        if span.name == self.name:
            self.starting.set()
            assert self.release.wait(10)


@agent_task
async def when_set(event: threading.Event, value: Any) -> Any:
    """``value``, once the test sets ``event``."""
    assert await asyncio.to_thread(event.wait, 10)
    return value


@pytest.mark.parametrize("run_status", ["completed", "failed"])
@pytest.mark.parametrize(("fail", "status"), [(False, "completed"), (True, "failed")])
def test_an_agent_task_starting_as_its_run_ends_ends_with_its_task(
    traced: Any, runtime: None, fail: bool, status: str, run_status: str
) -> None:
    """The run returns (or raises) while Motus starts the agent of its agent_call task: the agent
    is the task's to end, with its outcome, not the run's (which would leave a span never ended)."""
    client = GatedClient()
    client.gate.set()
    hold = HoldSpanStart("invoke_agent gated_agent")
    traced.provider.add_span_processor(hold)
    agent_ended = _when_ended(traced, "invoke_agent gated_agent")
    futures: list[Any] = []

    ready = threading.Event()

    @multirun.run
    def job() -> str:
        futures.append(gated_agent(client, when_set(ready, fail)))  # dispatched once its input is
        ready.set()
        assert hold.starting.wait(5)  # its agent is starting on Motus's loop thread
        if run_status == "failed":
            raise KeyError("the run gives up")
        return "returned"

    try:
        if run_status == "failed":
            with pytest.raises(KeyError):
                job()
        else:
            assert job() == "returned"
    finally:
        hold.release.set()
    if fail:
        with pytest.raises(ValueError, match="rejects"):
            resolve(futures[0])
    else:
        assert resolve(futures[0]) == "late answer"
    assert agent_ended.wait(5), "the agent's span never ended"
    agent = traced.span("invoke_agent gated_agent")
    assert agent.attributes[attr.AGENT_STATUS] == status
    assert agent.attributes[attr.TOKENS_USED] == 240
    assert agent.end_time >= traced.span("chat gpt-4o-mini").end_time
    assert traced.span("invoke_workflow job").attributes[attr.RUN_STATUS] == run_status


def test_an_agent_task_starting_after_its_run_returned_ends_with_its_task(
    traced: Any, runtime: None, caplog: pytest.LogCaptureFixture
) -> None:
    """An agent_call task whose input is ready only after its run returned: its agent starts under
    the ended run and ends with its task; its tokens are on its spans, and a warning says so."""
    client = GatedClient()
    client.gate.set()
    agent_ended = _when_ended(traced, "invoke_agent gated_agent")
    ready = threading.Event()
    futures: list[Any] = []

    @multirun.run
    def job() -> str:
        futures.append(gated_agent(client, when_set(ready, False)))  # not resolved here
        return "returned"

    assert job() == "returned"
    ready.set()
    assert resolve(futures[0]) == "late answer"
    assert agent_ended.wait(5)
    run, agent = traced.span("invoke_workflow job"), traced.span("invoke_agent gated_agent")
    assert traced.parent_of(agent) is run and agent.start_time >= run.end_time
    assert agent.attributes[attr.AGENT_STATUS] == "completed"
    assert agent.attributes[attr.TOKENS_USED] == 240
    assert run.attributes[attr.TOKENS_USED] == 0
    late = [r.getMessage() for r in caplog.records if "after run" in r.getMessage()]
    assert len(late) == 1 and "240 tokens" in late[0] and "'job'" in late[0]


class SaidLate(ValueError):
    """An error of the program's whose text, when ``then`` is set, is given after ``then`` ran."""

    then: Any = None

    def __str__(self) -> str:
        then, self.then = self.then, None
        if then is not None:
            then()
        return "said late"


@agent_task
def refuses() -> str:
    raise SaidLate()


def test_a_task_ending_while_its_run_ends_leaves_the_run_to_return(traced: Any, runtime: None) -> None:
    """A task the run left running ends on Motus's loop thread while the run, returning on the
    program's, records its steps (here, as it reads the text of a step's error): the run returns."""
    ready = threading.Event()
    futures: list[Any] = []

    def task_ends_now() -> None:
        ready.set()
        assert resolve(futures[0]) == "late"  # its step has ended

    @multirun.run
    def job() -> str:
        futures.append(when_set(ready, "late"))  # not resolved here
        with pytest.raises(SaidLate) as refused:
            resolve(refuses())
        refused.value.then = task_ends_now
        return "returned"

    assert job() == "returned"
    assert traced.span("invoke_workflow job").attributes[attr.RUN_STATUS] == "completed"


def test_an_agents_steps_can_be_read_while_a_task_of_its_run_ends(traced: Any, runtime: None) -> None:
    """The program reads its agent's steps while a task of the run ends on Motus's loop thread
    (here, as the text of a step's error is read): it gets them."""
    ready = threading.Event()

    @multirun.run
    def job() -> list[str]:
        late = when_set(ready, "late")

        def task_ends_now() -> None:
            ready.set()
            assert resolve(late) == "late"  # its step has ended

        with pytest.raises(SaidLate) as refused:
            resolve(refuses())
        refused.value.then = task_ends_now
        return [step.name for step in get_current_agent_context().steps]

    assert job() == ["refuses"]


class SlowToSay(ValueError):
    """An error whose first text is given when the test says so (or after 5 s: ``waited_out``)."""

    asked = threading.Event()
    go = threading.Event()
    waited_out = False

    def __str__(self) -> str:
        cls = type(self)
        if not cls.asked.is_set():
            cls.asked.set()
            cls.waited_out = not cls.go.wait(5)
        return "slow to say"


@agent_task(retries=1)
def fails_slowly() -> str:
    raise SlowToSay()


def test_motus_goes_on_while_the_program_says_what_a_retried_attempt_raised(
    traced: Any, runtime: None
) -> None:
    """The instrumentation records the error of an attempt Motus retries in the task's thread, and
    the program's ``__str__`` runs there: Motus's loop, settling the task meanwhile (cancelled),
    does not wait for it, nor do the program's other tasks."""
    SlowToSay.asked.clear()
    SlowToSay.go.clear()
    step_ended = _when_ended(traced, "step fails_slowly")
    future = fails_slowly()
    try:
        assert SlowToSay.asked.wait(5)  # the failed attempt is being recorded
        cancel(future)
        assert resolve(consume("x")) == "X"
    finally:
        SlowToSay.go.set()
    assert not SlowToSay.waited_out, "Motus's loop waited for the program's __str__"
    with pytest.raises(TaskCancelledError):
        resolve(future)
    assert step_ended.wait(5)  # when its thread returned
    assert traced.span("step fails_slowly").attributes[attr.STEP_STATUS] == "cancelled"


SPENT_DURING_THE_BACKOFF: list[str] = []
FLAKY_FAILED = threading.Event()


@agent_task(retries=1, retry_delay=1.0)
def flaky_once() -> str:
    """Fails its first call at once; Motus retries it a second later (half a second left a
    loaded machine too little to spend the budget in)."""
    SPENT_DURING_THE_BACKOFF.append("flaky")
    if SPENT_DURING_THE_BACKOFF.count("flaky") == 1:
        FLAKY_FAILED.set()
        raise ConnectionError("upstream down")
    return "retried"


@agent_task
def spend_it_all() -> str:
    """Spends the whole budget while flaky_once waits for its retry."""
    assert FLAKY_FAILED.wait(GENEROUS)
    multirun.report_usage("gpt-4o-mini", input_tokens=500, output_tokens=100)
    SPENT_DURING_THE_BACKOFF.append("spent")
    return "spent"


def test_a_retry_is_refused_when_the_budget_was_spent_during_its_backoff(traced: Any, runtime: None) -> None:
    # another task spent the budget while Motus waited to retry: the retry must not run, and
    # its step says the budget refused it, as a decorated step's retry after a backoff does
    SPENT_DURING_THE_BACKOFF.clear()
    FLAKY_FAILED.clear()

    @multirun.run(budget=Budget(max_tokens=500))
    def job() -> tuple[str, str]:
        flaky, spender = flaky_once(), spend_it_all()
        return resolve(spender), resolve(flaky)

    with pytest.raises(BudgetExceededError) as raised:
        job()
    assert raised.value.limit == "max_tokens"
    assert SPENT_DURING_THE_BACKOFF == ["flaky", "spent"]  # the retry never ran
    step = traced.span("step flaky_once")
    assert step.attributes[attr.POLICY_DECISION] == "abort"
    assert step.attributes[attr.POLICY_RULE] == "budget"
    assert step.attributes[attr.BUDGET_EXCEEDED_LIMIT] == "max_tokens"
    assert step.attributes[attr.ERROR_TYPE].endswith("BudgetExceededError")


@agent_task(task_type="model_call", retries=1, retry_delay=1.0)
def flaky_model_once(model: str) -> str:
    """A model call that fails its first attempt at once; Motus retries it a second later."""
    SPENT_DURING_THE_BACKOFF.append("flaky")
    if SPENT_DURING_THE_BACKOFF.count("flaky") == 1:
        FLAKY_FAILED.set()
        raise ConnectionError("upstream down")
    return "retried"


def test_a_model_call_whose_retry_the_budget_refuses_is_timed_with_the_calls_error(
    traced: Any, runtime: None, metric_reader: Any
) -> None:
    # gen_ai.client.operation.duration is about the provider: the call failed with its own
    # error; the budget's refusal of the retry is multirun's, on the step's span
    from genai_metrics import points

    SPENT_DURING_THE_BACKOFF.clear()
    FLAKY_FAILED.clear()

    @multirun.run(budget=Budget(max_tokens=500))
    def job() -> tuple[str, str]:
        flaky, spender = flaky_model_once("gpt-4o-mini"), spend_it_all()
        return resolve(spender), resolve(flaky)

    with pytest.raises(BudgetExceededError):
        job()
    assert SPENT_DURING_THE_BACKOFF == ["flaky", "spent"]  # the retry never ran
    timed = [
        p.attributes.get(attr.ERROR_TYPE) for p in points(metric_reader, "gen_ai.client.operation.duration")
    ]
    assert timed == ["ConnectionError"]
    (step,) = [s for s in traced.named(CHAT) if s.attributes[attr.STEP_NAME] == "flaky_model_once"]
    assert step.attributes[attr.ERROR_TYPE].endswith("BudgetExceededError")


def test_a_misspelt_option_to_instrument_is_a_type_error_naming_it(instrumented: MotusInstrumentor) -> None:
    # instrument(polcy=...) was accepted without a word: the runs had no policy at all
    with pytest.raises(
        TypeError, match=r"^MotusInstrumentor\(\)\.instrument\(\) got an unknown option 'polcy'"
    ):
        instrumented.instrument(polcy=Policy())
    with pytest.raises(TypeError, match=r"'tracer_provder'.*tracer_provider"):
        instrumented.instrument(tracer_provder=None)


def test_a_model_call_whose_retry_the_circuit_refuses_is_timed_with_the_calls_error(
    traced: Any, runtime: None, metric_reader: Any
) -> None:
    from genai_metrics import points

    client = FlakyClient(traced.clock, failures=5)

    @multirun.run(policy=Policy(circuit_breaker=CircuitBreakerRule(failure_threshold=2)))
    def job() -> str:
        return str(resolve(ask_once(client, "gpt-4o-mini", "hello")).content)

    with pytest.raises(PolicyViolation, match="circuit"):
        job()  # two calls fail; the circuit opens and refuses Motus's second retry
    assert len(client.times) == 2
    timed = [
        p.attributes.get(attr.ERROR_TYPE) for p in points(metric_reader, "gen_ai.client.operation.duration")
    ]
    assert timed == ["ConnectionError"]  # the model's error, not multirun's refusal


# ---------------------------------------------------------------------------
# tools that raise: Motus hands the model the error, the span still shows it


def _failing_tools() -> tuple[Any, Any]:
    from motus.tools import FunctionTool

    async def failing_search(query: str) -> str:
        """Search the web for ``query``."""
        raise ConnectionError(f"search backend down for {query!r}")

    def failing_sync_search(query: str) -> str:
        """Search the web for ``query``."""
        raise ValueError("no index")

    return (
        FunctionTool(failing_search, name="web_search"),
        FunctionTool(failing_sync_search, name="web_search"),
    )


@pytest.mark.parametrize("which", [0, 1], ids=["async", "sync"])
def test_a_tool_that_raises_inside_an_agent_shows_its_error(
    traced: Any, runtime: None, crew: ModuleType, which: int
) -> None:
    """Motus's ``Tool._execute`` turns a tool's error into ``{"error": ...}`` for the model and
    the task completes: the tool's span must still show the error, the agent goes on."""
    from motus.agent import ReActAgent

    failing = _failing_tools()[which]
    solo = ReActAgent(client=crew.FakeChatClient(), model_name="gpt-4o-mini", name="solo", tools=[failing])
    answer = resolve(solo("What is OpenTelemetry?"))
    assert "error" in answer  # the model was told, and answered: Motus's decision stands
    expected = ConnectionError if which == 0 else ValueError
    tool = traced.span("execute_tool web_search")
    assert tool.attributes[attr.ERROR_TYPE] == expected.__qualname__
    assert tool.status.status_code is StatusCode.ERROR
    (event,) = [e for e in tool.events if e.name == "exception"]
    assert event.attributes["exception.type"] == expected.__qualname__
    assert event.attributes["exception.escaped"] == "False"
    assert tool.attributes[attr.STEP_STATUS] == "completed"  # the task's outcome: its result went on
    assert traced.span("invoke_agent solo").attributes[attr.AGENT_STATUS] == "completed"
    assert traced.span("invoke_workflow solo").attributes[attr.RUN_STATUS] == "completed"


def test_a_tool_called_as_a_task_that_raises_shows_its_error(traced: Any, runtime: None) -> None:
    failing, _ = _failing_tools()
    result = resolve(failing('{"query": "otel"}'))
    assert "search backend down" in result
    tool = traced.span("execute_tool web_search")
    assert tool.attributes[attr.ERROR_TYPE] == "ConnectionError"
    assert tool.status.status_code is StatusCode.ERROR
    assert [e.attributes["exception.message"] for e in tool.events if e.name == "exception"] == [
        "search backend down for 'otel'"
    ]


def test_a_tool_that_returns_an_error_payload_is_no_failure(traced: Any, runtime: None) -> None:
    from motus.tools import FunctionTool

    async def find(key: str) -> dict[str, str]:
        return {"error": "not found"}  # the tool's own answer, not a raise

    lookup = FunctionTool(find, name="lookup")
    assert resolve(lookup('{"key": "k"}')) == '{"error": "not found"}'
    span = traced.span("execute_tool lookup")
    assert attr.ERROR_TYPE not in span.attributes
    assert span.status.status_code is not StatusCode.ERROR
    assert not [e for e in span.events if e.name == "exception"]
