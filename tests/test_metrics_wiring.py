"""The metrics a run actually produces, read back from the SDK's in-memory reader."""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import context as otel_context
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.trace import SpanKind, Status, StatusCode

import multirun
from multirun import run, step
from multirun.errors import BudgetExceededError
from multirun.models import Budget, Policy, StepKind
from multirun.models.policy import DegradationTrigger, GracefulDegradationRule, RateLimitRule


@pytest.fixture
def reader(traced) -> Iterator[InMemoryMetricReader]:
    metric_reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[metric_reader])
    client = multirun.init(tracer_provider=traced.provider, meter_provider=provider)
    client.clock = traced.clock
    yield metric_reader
    provider.shutdown()


def points(reader: InMemoryMetricReader, name: str) -> list[tuple[dict[str, Any], Any]]:
    data = reader.get_metrics_data()
    found = []
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    found += [(dict(p.attributes or {}), p) for p in metric.data.data_points]
    return found


def test_steps_runs_usage_and_cost_are_counted(reader) -> None:
    @step(kind=StepKind.LLM_CALL, model="gpt-4o-mini")
    def ask() -> None:
        multirun.report_usage("gpt-4o-mini", input_tokens=1000, output_tokens=200, provider="openai")

    @step
    def tidy() -> None:
        pass

    @run
    def research() -> None:
        ask()
        ask()
        tidy()

    research()
    steps = {
        (a["multirun.step.kind"], a["multirun.step.status"]): p.value
        for a, p in points(reader, "multirun.steps")
    }
    assert steps == {("llm_call", "completed"): 2, ("function", "completed"): 1}
    runs = points(reader, "multirun.runs")
    assert [(a["gen_ai.workflow.name"], a["multirun.run.status"], p.value) for a, p in runs] == [
        ("research", "completed", 1)
    ]
    usage = {a["gen_ai.token.type"]: p for a, p in points(reader, "gen_ai.client.token.usage")}
    assert usage["input"].sum == 2000 and usage["output"].sum == 400
    assert usage["input"].count == 2
    [(cost_attrs, cost)] = points(reader, "multirun.cost")
    assert cost.value == pytest.approx(2 * (1000 * 0.15 + 200 * 0.6) / 1e6)
    assert "multirun.run.id" not in cost_attrs
    [(_, duration)] = points(reader, "gen_ai.client.operation.duration")
    assert duration.count == 2


def test_budget_exceeded_and_policy_decisions_are_counted(reader, traced) -> None:
    traced.clock.advance_on_sleep = True

    @step(kind=StepKind.LLM_CALL, model="m")
    def ask() -> None:
        pass

    @run(budget=Budget(max_steps=2), policy=Policy(rate_limit=RateLimitRule(requests_per_minute=60)))
    def main() -> None:
        for _ in range(3):
            ask()

    with pytest.raises(BudgetExceededError):
        main()
    exceeded = points(reader, "multirun.budget.exceeded")
    assert [(a["multirun.budget.limit"], p.value) for a, p in exceeded] == [("max_steps", 1)]
    found = points(reader, "multirun.policy.decisions")
    decisions = {a["multirun.policy.decision"]: p.value for a, p in found}
    # the third step was refused by the budget: it counts as an abort, not as the wait it was given;
    # "proceed" is not counted (it is every other step)
    assert decisions == {"wait": 1, "abort": 1}


def test_a_step_that_waits_and_gets_the_fallback_model_counts_both_decisions(reader, traced) -> None:
    traced.clock.advance_on_sleep = True

    @step(kind=StepKind.LLM_CALL, model="big")
    def ask() -> None:
        pass

    degrade = GracefulDegradationRule(
        fallback_model="small", trigger=DegradationTrigger.BUDGET_PERCENTAGE, threshold=40
    )

    @run(
        budget=Budget(max_steps=4),
        policy=Policy(rate_limit=RateLimitRule(requests_per_minute=60), graceful_degradation=degrade),
    )
    def main() -> None:
        for _ in range(3):
            ask()

    main()
    found = points(reader, "multirun.policy.decisions")
    decisions = {(a["multirun.policy.decision"], a["multirun.policy.rule"]): p.value for a, p in found}
    # steps 2 and 3 waited for their slot; step 3 got the fallback model as well
    assert decisions == {("wait", "rate_limit"): 2, ("fallback", "graceful_degradation"): 1}


def test_a_step_retried_counts_each_decision_it_got_once_not_once_per_attempt(reader, traced) -> None:
    traced.clock.advance_on_sleep = True
    attempts: list[int] = []

    @step(kind=StepKind.LLM_CALL, model="big", retry=3, retry_delay=0.1)
    def ask() -> None:
        attempts.append(1)
        if len(attempts) < 4:
            raise TimeoutError("slow")

    degrade = GracefulDegradationRule(fallback_model="small", threshold=0)  # degraded from the start

    @run(
        budget=Budget(max_tokens=1000),
        policy=Policy(rate_limit=RateLimitRule(requests_per_minute=60), graceful_degradation=degrade),
    )
    def main() -> None:
        ask()  # its first slot is free; each retry waits for the next one

    main()
    assert len(attempts) == 4  # each on the fallback model
    found = points(reader, "multirun.policy.decisions")
    decisions = {(a["multirun.policy.decision"], a["multirun.policy.rule"]): p.value for a, p in found}
    # one step: it waited and fell back, as its span says, once each ("every other step proceeded")
    assert decisions == {("wait", "rate_limit"): 1, ("fallback", "graceful_degradation"): 1}
    steps = {a["multirun.step.status"]: p.value for a, p in points(reader, "multirun.steps")}
    assert steps == {"completed": 1}


def test_an_llm_step_whose_retry_the_circuit_refuses_times_its_call_with_the_calls_error(
    reader, traced
) -> None:
    from multirun.errors import PolicyViolation
    from multirun.models.policy import CircuitBreakerRule

    @step(kind=StepKind.LLM_CALL, model="gpt-4o-mini", retry=3, retry_delay=0.1)
    def ask() -> None:
        raise TimeoutError("slow")

    @run(policy=Policy(circuit_breaker=CircuitBreakerRule(failure_threshold=2)))
    def main() -> None:
        ask()

    with pytest.raises(PolicyViolation):
        main()  # two attempts time out; the circuit opens and refuses the third
    [(attributes, duration)] = points(reader, "gen_ai.client.operation.duration")
    assert duration.count == 1
    # the model's call failed with its timeout; the refusal is multirun's, not the provider's
    assert attributes["error.type"] == "TimeoutError"
    [(step_attributes, _)] = points(reader, "multirun.step.duration")
    assert step_attributes["error.type"] == "multirun.errors.PolicyViolation"  # the step's own error


def test_an_llm_step_whose_retry_the_budget_refuses_after_its_backoff_times_its_call_with_the_calls_error(
    reader, traced
) -> None:
    import threading

    spent = threading.Event()

    @step(kind=StepKind.LLM_CALL, model="gpt-4o-mini", retry=1, retry_delay=5)
    def ask() -> None:
        raise TimeoutError("slow")

    @step(kind=StepKind.LLM_CALL, model="gpt-4o-mini")
    def spend() -> None:
        multirun.report_usage("gpt-4o-mini", input_tokens=100, output_tokens=0)

    sleep = traced.clock.sleep

    def sleeping(seconds: float) -> None:  # during the backoff, a step beside it spends the budget
        sleep(seconds)
        if not spent.is_set():
            spent.set()
            beside = otel_context.attach(multirun.context.get_current_run_context().otel_context)
            try:
                spend()
            finally:
                otel_context.detach(beside)

    @run(budget=Budget(max_tokens=100))
    def main() -> None:
        traced.clock.sleep = sleeping  # type: ignore[method-assign]
        ask()

    with pytest.raises(BudgetExceededError):
        main()
    timed = {a.get("error.type") for a, _ in points(reader, "gen_ai.client.operation.duration")}
    assert timed == {None, "TimeoutError"}  # spend's call, and ask's, which timed out


def test_a_refused_llm_step_is_no_genai_operation(reader) -> None:
    # the model was never called: gen_ai.client.operation.duration times calls made, and a
    # BudgetExceededError there would read as a failing provider on dashboards
    @step(kind=StepKind.LLM_CALL, model="gpt-4o-mini")
    def ask() -> None:
        multirun.report_usage("gpt-4o-mini", input_tokens=10, output_tokens=2, provider="openai")

    @run(budget=Budget(max_steps=1))
    def main() -> None:
        ask()
        ask()

    with pytest.raises(BudgetExceededError):
        main()
    [(attributes, duration)] = points(reader, "gen_ai.client.operation.duration")
    assert duration.count == 1
    assert "error.type" not in attributes
    steps = {a["multirun.step.status"]: p.value for a, p in points(reader, "multirun.steps")}
    assert steps == {"completed": 1, "failed": 1}  # the refusal is still a failed step


def _foreign_llm_span(traced, attributes: dict[str, Any]) -> None:  # type: ignore[no-untyped-def]
    """An LLM span of another instrumentation, ended inside the current step."""
    with traced.provider.get_tracer("some.other.instrumentation").start_as_current_span(
        "chat", attributes=attributes
    ):
        pass


@pytest.mark.parametrize(
    "attributes",
    [
        {"llm.token_count.prompt": 120, "llm.token_count.completion": 30, "llm.model_name": "gpt-4o"},
        {"llm.usage.prompt_tokens": 120, "llm.usage.completion_tokens": 30, "gen_ai.request.model": "gpt-4o"},
    ],
    ids=["openinference", "llm-usage-names"],
)
def test_usage_on_spans_of_instrumentations_that_record_no_metrics_is_in_the_genai_histogram(
    reader, traced, attributes
) -> None:
    # OpenInference (and whatever writes the llm.usage.* names) traces only: nobody else records
    # gen_ai.client.token.usage for these calls
    @step
    def call_model() -> None:
        _foreign_llm_span(traced, attributes)

    @run
    def main() -> None:
        call_model()
        call_model()

    main()
    usage = {a["gen_ai.token.type"]: (a, p) for a, p in points(reader, "gen_ai.client.token.usage")}
    assert {token_type: p.sum for token_type, (_, p) in usage.items()} == {"input": 240, "output": 60}
    assert usage["input"][1].count == 2
    assert usage["input"][0]["gen_ai.response.model"] == "gpt-4o"
    tokens = {a["gen_ai.token.type"]: p.value for a, p in points(reader, "multirun.tokens")}
    assert tokens == {"input": 240, "output": 60}


@pytest.mark.parametrize(
    "attributes",
    [
        {"gen_ai.usage.input_tokens": 120, "gen_ai.usage.output_tokens": 30, "gen_ai.request.model": "m"},
        {"gen_ai.usage.prompt_tokens": 120, "gen_ai.usage.completion_tokens": 30, "gen_ai.system": "openai"},
    ],
    ids=["genai", "openllmetry"],
)
def test_usage_on_genai_convention_spans_is_left_to_their_instrumentation_in_the_genai_histogram(
    reader, traced, attributes
) -> None:
    # openai-v2 and OpenLLMetry record gen_ai.client.token.usage themselves, next to their spans
    @step
    def call_model() -> None:
        _foreign_llm_span(traced, attributes)

    @run
    def main() -> None:
        call_model()

    main()
    assert points(reader, "gen_ai.client.token.usage") == []
    tokens = {a["gen_ai.token.type"]: p.value for a, p in points(reader, "multirun.tokens")}
    assert tokens == {"input": 120, "output": 30}


OPENINFERENCE_CALL = {
    "openinference.span.kind": "LLM",
    "llm.model_name": "gpt-4o",
    "llm.token_count.prompt": 120,
    "llm.token_count.completion": 30,
}


def durations(reader: InMemoryMetricReader) -> list[tuple[dict[str, Any], int]]:
    """gen_ai.client.operation.duration: (attributes, how many calls) per series."""
    return [(a, p.count) for a, p in points(reader, "gen_ai.client.operation.duration")]


@pytest.mark.parametrize("kind", [StepKind.FUNCTION, StepKind.LLM_CALL])
@pytest.mark.parametrize(
    "attributes",
    [
        OPENINFERENCE_CALL,
        {"llm.usage.prompt_tokens": 120, "llm.usage.completion_tokens": 30, "gen_ai.request.model": "gpt-4o"},
    ],
    ids=["openinference", "llm-usage-names"],
)
def test_calls_on_spans_of_instrumentations_that_record_no_metrics_are_timed_once(
    reader, traced, attributes, kind
) -> None:
    # nobody else records gen_ai.client.operation.duration for these calls; an LLM step around
    # the call leaves the timing to the call's own span
    @step(kind=kind)
    def call_model() -> None:
        _foreign_llm_span(traced, attributes)

    @run
    def main() -> None:
        call_model()
        call_model()

    main()
    [(attributes_seen, count)] = durations(reader)
    assert count == 2
    assert attributes_seen == {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "gpt-4o",
        "gen_ai.response.model": "gpt-4o",
    }


def test_an_openinference_call_with_a_provider_is_timed_with_it(reader, traced) -> None:
    @run
    def main() -> None:  # no step: the call is the run's
        _foreign_llm_span(traced, {**OPENINFERENCE_CALL, "gen_ai.system": "openai"})

    main()
    [(attributes, count)] = durations(reader)
    assert count == 1 and attributes["gen_ai.provider.name"] == "openai"


def test_a_failed_openinference_call_is_timed_with_its_error_type(reader, traced) -> None:
    # a failed call reports no usage, but it was made and took its time
    @step(kind=StepKind.LLM_CALL)
    def call_model() -> None:
        tracer = traced.provider.get_tracer("openinference.instrumentation.openai")
        attributes = {"openinference.span.kind": "LLM", "llm.model_name": "gpt-4o"}
        with tracer.start_as_current_span("ChatCompletion", attributes=attributes):
            raise TimeoutError("the provider did not answer")

    @run
    def main() -> None:
        call_model()

    with pytest.raises(TimeoutError):
        main()
    [(attributes, count)] = durations(reader)
    assert count == 1
    assert attributes == {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "gpt-4o",
        "gen_ai.response.model": "gpt-4o",
        "error.type": "TimeoutError",
    }


OPENINFERENCE_EMBEDDINGS = {  # as its spec shows one: no completion count, the model in embedding.*
    "openinference.span.kind": "EMBEDDING",
    "embedding.model_name": "text-embedding-3-small",
    "llm.token_count.prompt": 8,
    "llm.token_count.total": 8,
}


@pytest.mark.parametrize("fails", [False, True], ids=["answered", "failed"])
def test_an_openinference_embeddings_call_is_an_embeddings_operation_of_its_model(
    reader, traced, fails
) -> None:
    # not a chat call of no model with 0 output tokens
    @step(kind=StepKind.LLM_CALL)
    def embed() -> None:
        tracer = traced.provider.get_tracer("openinference.instrumentation.openai")
        attributes = {k: v for k, v in OPENINFERENCE_EMBEDDINGS.items() if not (fails and "count" in k)}
        with tracer.start_as_current_span("CreateEmbeddings", attributes=attributes):
            if fails:
                raise TimeoutError("the provider did not answer")

    @run
    def main() -> None:
        embed()

    if fails:
        with pytest.raises(TimeoutError):
            main()
    else:
        main()
    model = "text-embedding-3-small"
    operation = {"gen_ai.operation.name": "embeddings"}
    models = {"gen_ai.request.model": model, "gen_ai.response.model": model}
    [(attributes, count)] = durations(reader)
    assert count == 1
    assert attributes == {**operation, **models, **({"error.type": "TimeoutError"} if fails else {})}
    usage = [(a, p.sum) for a, p in points(reader, "gen_ai.client.token.usage")]
    if fails:
        assert usage == []
        return
    assert usage == [({**models, **operation, "gen_ai.token.type": "input"}, 8)]


@pytest.mark.parametrize("usage", [True, False], ids=["with-usage", "without-usage"])
def test_an_openinference_call_wrapped_in_another_is_timed_once(reader, traced, usage) -> None:
    # LangChain's OpenInference LLM span around the OpenAI SDK's: one call, two spans
    inner = OPENINFERENCE_CALL if usage else {"openinference.span.kind": "LLM", "llm.model_name": "gpt-4o"}
    tracer = traced.provider.get_tracer("openinference.instrumentation.langchain")

    @run
    def main() -> None:
        with (
            tracer.start_as_current_span("ChatOpenAI", attributes=dict(inner)),
            tracer.start_as_current_span("chain step"),
        ):
            _foreign_llm_span(traced, inner)

    main()
    assert [count for _, count in durations(reader)] == [1]


@pytest.mark.parametrize("nested", [False, True], ids=["in-the-llm-step", "in-a-step-inside-it"])
def test_a_span_of_both_conventions_is_left_to_the_genai_instrumentation(reader, traced, nested) -> None:
    # the GenAI instrumentation that wrote gen_ai.usage.* times the call itself; its span names a
    # model call only by that usage, at its end: an LLM step around its step must hear so then
    @step(kind=StepKind.FUNCTION if nested else StepKind.LLM_CALL)
    def call_model() -> None:
        _foreign_llm_span(
            traced,
            {**OPENINFERENCE_CALL, "gen_ai.usage.input_tokens": 120, "gen_ai.usage.output_tokens": 30},
        )

    @step(kind=StepKind.LLM_CALL)
    def answer() -> None:
        call_model()

    @run
    def main() -> None:
        answer() if nested else call_model()

    main()
    assert durations(reader) == []


@pytest.mark.parametrize("usage", [True, False], ids=["with-usage", "without-usage"])
def test_an_llm_step_around_a_step_with_an_openinference_call_does_not_time_it_again(
    reader, traced, usage
) -> None:
    call = OPENINFERENCE_CALL if usage else {"openinference.span.kind": "LLM", "llm.model_name": "gpt-4o"}

    @step
    def call_model() -> None:
        _foreign_llm_span(traced, call)

    @step(kind=StepKind.LLM_CALL)
    def answer() -> None:
        call_model()

    @run
    def main() -> None:
        answer()

    main()
    assert [count for _, count in durations(reader)] == [1]


# ---------------------------------------------------------------------------
# OpenLLMetry (Traceloop) times each call it makes in gen_ai.client.operation.duration, failed
# ones too; the span of a failed call has no usage, and names the call by llm.request.type alone

OPENLLMETRY_SCOPE = "opentelemetry.instrumentation.openai.v1"  # its tracer's and meter's name


@pytest.fixture
def openllmetry(traced) -> Iterator[tuple[InMemoryMetricReader, MeterProvider]]:
    """multirun, and the meter provider an OpenLLMetry instrumentation records to, on one reader."""
    metric_reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[metric_reader])
    client = multirun.init(tracer_provider=traced.provider, meter_provider=provider)
    client.clock = traced.clock
    yield metric_reader, provider
    provider.shutdown()


class APIConnectionError(Exception):
    pass


def _openllmetry_failed_call(traced, meters: MeterProvider, span_name: str, request_type: str) -> None:  # type: ignore[no-untyped-def]
    """A call that fails, as OpenLLMetry's OpenAI instrumentation records it (chat_wrappers.py,
    embeddings_wrappers.py of traceloop/openllmetry): a CLIENT span started with llm.request.type
    only, the request's attributes, no gen_ai.operation.name; on the error, the duration recorded
    with its error.type, then error.type, the exception and an ERROR status on the span, ended."""
    tracer = traced.provider.get_tracer(OPENLLMETRY_SCOPE, "0.47.3")
    duration_histogram = meters.get_meter(OPENLLMETRY_SCOPE, "0.47.3").create_histogram(
        name="gen_ai.client.operation.duration", unit="s", description="GenAI operation duration"
    )
    span = tracer.start_span(span_name, kind=SpanKind.CLIENT, attributes={"llm.request.type": request_type})
    span.set_attribute("gen_ai.system", "openai")
    span.set_attribute("gen_ai.request.model", "gpt-4o-mini")
    span.set_attribute("llm.headers", "None")
    span.set_attribute("llm.is_streaming", False)
    span.set_attribute("gen_ai.openai.api_base", "https://api.openai.com/v1/")
    span.set_attribute("gen_ai.prompt.0.role", "user")
    span.set_attribute("gen_ai.prompt.0.content", "are you there?")
    start_time = time.time()
    try:
        time.sleep(0.001)  # the request, which gets no answer
        raise APIConnectionError("Connection error.")
    except Exception as e:
        duration_histogram.record(time.time() - start_time, attributes={"error.type": e.__class__.__name__})
        span.set_attribute("error.type", e.__class__.__name__)
        span.record_exception(e)
        span.set_status(Status(StatusCode.ERROR, str(e)))
        span.end()
        raise


# (span name, llm.request.type) of OpenLLMetry's model calls: those of its OpenAI instrumentation,
# and "completion", the type its Anthropic, Gemini and Vertex AI instrumentations give their calls
OPENLLMETRY_CALLS = [
    ("openai.chat", "chat"),
    ("openai.embeddings", "embedding"),
    ("anthropic.chat", "completion"),
]


@pytest.mark.parametrize(("span_name", "request_type"), OPENLLMETRY_CALLS)
@pytest.mark.parametrize("kind", [StepKind.LLM_CALL, StepKind.FUNCTION])
def test_a_failed_openllmetry_call_is_timed_once(openllmetry, traced, span_name, request_type, kind) -> None:
    # OpenLLMetry timed it: the LLM step around it must not time it again
    metric_reader, meters = openllmetry

    @step(kind=kind)
    def call_model() -> None:
        _openllmetry_failed_call(traced, meters, span_name, request_type)

    @run
    def main() -> None:
        call_model()

    with pytest.raises(APIConnectionError):
        main()
    assert durations(metric_reader) == [({"error.type": "APIConnectionError"}, 1)]  # OpenLLMetry's


@pytest.mark.parametrize("inner_kind", [StepKind.FUNCTION, StepKind.LLM_CALL])
def test_an_llm_step_around_a_step_with_a_failed_openllmetry_call_does_not_time_it_again(
    openllmetry, traced, inner_kind
) -> None:
    metric_reader, meters = openllmetry

    @step(kind=inner_kind)
    def call_model() -> None:
        _openllmetry_failed_call(traced, meters, "openai.chat", "chat")

    @step(kind=StepKind.LLM_CALL)
    def answer() -> None:
        with contextlib.suppress(APIConnectionError):
            call_model()

    @run
    def main() -> None:
        answer()
        answer()

    main()
    assert durations(metric_reader) == [({"error.type": "APIConnectionError"}, 2)]


def test_a_failed_openllmetry_call_wrapped_in_an_openinference_llm_span_is_timed_once(
    openllmetry, traced
) -> None:
    # LangChain's OpenInference LLM span around OpenLLMetry's OpenAI one: one call, two spans,
    # and the outer one, with no usage either, must not time what OpenLLMetry timed
    metric_reader, meters = openllmetry
    tracer = traced.provider.get_tracer("openinference.instrumentation.langchain")

    @run
    def main() -> None:
        with tracer.start_as_current_span(
            "ChatOpenAI", attributes={"openinference.span.kind": "LLM", "llm.model_name": "gpt-4o-mini"}
        ):
            _openllmetry_failed_call(traced, meters, "openai.chat", "chat")

    with pytest.raises(APIConnectionError):
        main()
    assert durations(metric_reader) == [({"error.type": "APIConnectionError"}, 1)]


@pytest.mark.parametrize("request_type", ["rerank", "unknown"])
def test_an_openllmetry_span_of_no_model_call_is_left_to_the_llm_step(
    openllmetry, traced, request_type
) -> None:
    # not a model call the conventions time: the LLM step around it times its call
    metric_reader, _ = openllmetry

    @step(kind=StepKind.LLM_CALL)
    def call_model() -> None:
        tracer = traced.provider.get_tracer(OPENLLMETRY_SCOPE)
        with tracer.start_as_current_span("cohere.rerank", attributes={"llm.request.type": request_type}):
            pass

    @run
    def main() -> None:
        call_model()

    main()
    [(attributes, count)] = durations(metric_reader)
    assert count == 1 and "error.type" not in attributes


def _openllmetry_failed_call_left_open(traced, meters: MeterProvider, provider: str) -> None:  # type: ignore[no-untyped-def]
    """A call that fails, as OpenLLMetry's Anthropic and Groq instrumentations record it (_wrap in
    their __init__.py of traceloop/openllmetry): a CLIENT span started with gen_ai.system and
    llm.request.type "completion"; on the error, the duration recorded with the error's type,
    and the error raised again, with the span never ended."""
    scope = f"opentelemetry.instrumentation.{provider}"
    tracer = traced.provider.get_tracer(scope, "0.40.0")
    duration_histogram = meters.get_meter(scope, "0.40.0").create_histogram(
        name="gen_ai.client.operation.duration", unit="s", description="GenAI operation duration"
    )
    span = tracer.start_span(
        f"{provider}.chat",
        kind=SpanKind.CLIENT,
        attributes={"gen_ai.system": provider.capitalize(), "llm.request.type": "completion"},
    )
    span.set_attribute("gen_ai.request.model", "some-model")
    start_time = time.time()
    try:
        time.sleep(0.001)  # the request, which gets no answer
        raise APIConnectionError("Connection error.")
    except Exception as e:
        attributes = {"gen_ai.system": provider, "error.type": e.__class__.__name__}
        duration_histogram.record(time.time() - start_time, attributes=attributes)
        raise


@pytest.mark.parametrize("provider", ["anthropic", "groq"])
def test_a_failed_openllmetry_call_whose_span_never_ends_is_timed_once(openllmetry, traced, provider) -> None:
    # OpenLLMetry timed it, and its span never ends: the LLM step around it must not time it again
    metric_reader, meters = openllmetry

    @step(kind=StepKind.LLM_CALL)
    def call_model() -> None:
        _openllmetry_failed_call_left_open(traced, meters, provider)

    @run
    def main() -> None:
        call_model()

    with pytest.raises(APIConnectionError):
        main()
    assert durations(metric_reader) == [({"gen_ai.system": provider, "error.type": "APIConnectionError"}, 1)]


def test_a_failed_openllmetry_call_left_open_in_an_openinference_llm_span_is_timed_once(
    openllmetry, traced
) -> None:
    # LangChain's OpenInference LLM span around it ends, with no usage: it is the same call
    metric_reader, meters = openllmetry
    tracer = traced.provider.get_tracer("openinference.instrumentation.langchain")

    @run
    def main() -> None:
        with tracer.start_as_current_span(
            "ChatAnthropic", attributes={"openinference.span.kind": "LLM", "llm.model_name": "some-model"}
        ):
            _openllmetry_failed_call_left_open(traced, meters, "anthropic")

    with pytest.raises(APIConnectionError):
        main()
    assert durations(metric_reader) == [
        ({"gen_ai.system": "anthropic", "error.type": "APIConnectionError"}, 1)
    ]


def test_an_openllmetry_stream_read_after_its_step_returned_is_timed_once(openllmetry, traced) -> None:
    # OpenLLMetry times a streamed call, and ends its span, when the stream is read to its end
    metric_reader, meters = openllmetry
    tracer = traced.provider.get_tracer(OPENLLMETRY_SCOPE)
    duration_histogram = meters.get_meter(OPENLLMETRY_SCOPE).create_histogram(
        name="gen_ai.client.operation.duration", unit="s"
    )

    @step(kind=StepKind.LLM_CALL)
    def call_model() -> Iterator[str]:
        span = tracer.start_span("openai.chat", kind=SpanKind.CLIENT, attributes={"llm.request.type": "chat"})

        def stream() -> Iterator[str]:
            yield "a"
            duration_histogram.record(0.5, attributes={"gen_ai.response.model": "gpt-4o-mini"})
            span.set_attributes({"gen_ai.usage.input_tokens": 10, "gen_ai.usage.output_tokens": 2})
            span.end()

        return stream()

    @run
    def main() -> list[str]:
        return list(call_model())

    assert main() == ["a"]
    assert durations(metric_reader) == [({"gen_ai.response.model": "gpt-4o-mini"}, 1)]


def test_an_openllmetry_stream_abandoned_half_read_is_timed_once_by_openllmetry_not_at_its_run_s_end(
    openllmetry, traced
) -> None:
    # OpenLLMetry's ChatStream times a stream it cleans up unfinished (its __del__: _ensure_cleanup,
    # _record_partial_metrics) and ends its span; at the run's end the call has not ended, and may
    # still be read: multirun times it neither then nor again
    metric_reader, meters = openllmetry
    tracer = traced.provider.get_tracer(OPENLLMETRY_SCOPE)
    duration_histogram = meters.get_meter(OPENLLMETRY_SCOPE).create_histogram(
        name="gen_ai.client.operation.duration", unit="s"
    )

    class ChatStream:
        def __init__(self) -> None:
            attributes = {"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o-mini"}
            self.span = tracer.start_span("openai.chat", kind=SpanKind.CLIENT, attributes=attributes)
            self.words = iter(["a", "b", "c"])

        def __iter__(self) -> ChatStream:
            return self

        def __next__(self) -> str:
            return next(self.words)

        def __del__(self) -> None:
            duration_histogram.record(0.5, attributes={"gen_ai.response.model": "gpt-4o-mini"})
            self.span.end()

    kept: list[ChatStream] = []

    @step(kind=StepKind.LLM_CALL)
    def call_model() -> str:
        stream = ChatStream()
        kept.append(stream)  # the program holds it past its run
        return next(stream)

    @run
    def main() -> str:
        return call_model()

    assert main() == "a"
    assert durations(metric_reader) == []  # the call has not ended
    kept.clear()
    gc.collect()
    assert durations(metric_reader) == [({"gen_ai.response.model": "gpt-4o-mini"}, 1)]


@pytest.mark.parametrize("kind", [StepKind.FUNCTION, StepKind.LLM_CALL])
def test_an_openllmetry_call_with_usage_under_the_llm_usage_names_is_metered_once(
    openllmetry, traced, kind
) -> None:
    # older OpenLLMetry versions (semconv_ai's first names) name the usage llm.usage.*, and record
    # gen_ai.client.token.usage and gen_ai.client.operation.duration themselves
    metric_reader, meters = openllmetry
    scope = "opentelemetry.instrumentation.anthropic"
    meter = meters.get_meter(scope)
    tokens = meter.create_histogram(name="gen_ai.client.token.usage", unit="token")
    duration = meter.create_histogram(name="gen_ai.client.operation.duration", unit="s")

    @step(kind=kind)
    def call_model() -> None:
        attributes = {"gen_ai.system": "Anthropic", "llm.request.type": "completion"}
        tracer = traced.provider.get_tracer(scope)
        with tracer.start_as_current_span("anthropic.chat", attributes=attributes) as span:
            metric_attributes = {"gen_ai.system": "anthropic", "gen_ai.response.model": "claude-3-5-haiku"}
            duration.record(0.5, attributes=metric_attributes)
            tokens.record(120, attributes={**metric_attributes, "gen_ai.token.type": "input"})
            tokens.record(30, attributes={**metric_attributes, "gen_ai.token.type": "output"})
            span.set_attributes({"llm.usage.prompt_tokens": 120, "llm.usage.completion_tokens": 30})

    @run
    def main() -> None:
        call_model()

    main()
    assert [count for _, count in durations(metric_reader)] == [1]
    usage = points(metric_reader, "gen_ai.client.token.usage")
    assert sorted((a["gen_ai.token.type"], p.count, p.sum) for a, p in usage) == [
        ("input", 1, 120),
        ("output", 1, 30),
    ]
    tokens_charged = {a["gen_ai.token.type"]: p.value for a, p in points(metric_reader, "multirun.tokens")}
    assert tokens_charged == {"input": 120, "output": 30}


WATSONX_SCOPE = "opentelemetry.instrumentation.watsonx"  # records llm.watsonx.* metrics, no GenAI ones


@pytest.mark.parametrize(
    "usage",
    [
        {"llm.usage.prompt_tokens": 120, "llm.usage.completion_tokens": 30},
        {"gen_ai.usage.prompt_tokens": 120, "gen_ai.usage.completion_tokens": 30},
    ],
    ids=["llm-usage-names", "genai-usage-names"],
)
@pytest.mark.parametrize("kind", [StepKind.FUNCTION, StepKind.LLM_CALL])
def test_a_watsonx_call_is_metered_by_multirun(reader, traced, usage, kind) -> None:
    # OpenLLMetry's watsonx instrumentation records llm.watsonx.completions.duration and .tokens,
    # not the GenAI metrics: multirun records them for its calls, once
    @step(kind=kind)
    def call_model() -> None:
        attributes = {"llm.vendor": "Watsonx", "llm.request.type": "completion"}
        tracer = traced.provider.get_tracer(WATSONX_SCOPE)
        with tracer.start_as_current_span("watsonx.generate", attributes=attributes) as span:
            span.set_attributes({**usage, "gen_ai.response.model": "ibm/granite-13b-chat-v2"})

    @run
    def main() -> None:
        call_model()

    main()
    [(attributes, count)] = durations(reader)
    assert count == 1 and attributes["gen_ai.response.model"] == "ibm/granite-13b-chat-v2"
    usage_seen = points(reader, "gen_ai.client.token.usage")
    assert sorted((a["gen_ai.token.type"], p.sum) for a, p in usage_seen) == [("input", 120), ("output", 30)]


def test_a_failed_watsonx_call_whose_span_never_ends_is_timed_by_its_llm_step(reader, traced) -> None:
    # watsonx leaves the span of a failed call open and times it in a metric of its own: the LLM
    # step is the call's one GenAI duration (its model set-up span is no model call either)
    tracer = traced.provider.get_tracer(WATSONX_SCOPE)
    attributes = {"llm.vendor": "Watsonx", "llm.request.type": "completion"}

    @step(kind=StepKind.LLM_CALL)
    def call_model() -> None:
        with tracer.start_as_current_span("watsonx.model_init", attributes=attributes):
            pass
        tracer.start_span("watsonx.generate", attributes=attributes)
        raise APIConnectionError("Connection error.")

    @run
    def main() -> None:
        call_model()

    with pytest.raises(APIConnectionError):
        main()
    [(attributes_seen, count)] = durations(reader)
    assert count == 1 and attributes_seen["error.type"].endswith("APIConnectionError")


def test_an_llm_step_around_an_llm_step_times_the_one_call_once(reader) -> None:
    @step(kind=StepKind.LLM_CALL, model="gpt-4o-mini")
    def ask() -> None:
        multirun.report_usage("gpt-4o-mini", input_tokens=10, output_tokens=2, provider="openai")

    @step(kind=StepKind.LLM_CALL)
    def answer() -> None:
        ask()

    @run
    def main() -> None:
        answer()
        answer()

    main()
    [(attributes, count)] = durations(reader)
    assert count == 2
    assert attributes["gen_ai.response.model"] == "gpt-4o-mini"  # the inner step's, which made it


def test_an_llm_step_around_a_call_reported_in_a_plain_step_times_it(reader) -> None:
    # nobody below timed the call: the LLM step around it is the one that does
    @step
    def ask() -> None:
        multirun.report_usage("gpt-4o-mini", input_tokens=10, output_tokens=2, provider="openai")

    @step(kind=StepKind.LLM_CALL)
    def answer() -> None:
        ask()

    @run
    def main() -> None:
        answer()

    main()
    assert [count for _, count in durations(reader)] == [1]


@pytest.mark.parametrize(
    ("names", "provider"),
    [
        ({"llm.provider": "openai", "llm.system": "openai"}, "openai"),
        ({"llm.provider": "azure", "llm.system": "openai"}, "azure.ai.openai"),  # the host wins
        ({"llm.provider": "anthropic"}, "anthropic"),
        ({"llm.provider": "google"}, "gcp.gen_ai"),
        ({"llm.provider": "aws", "llm.system": "anthropic"}, "aws.bedrock"),
        ({"llm.provider": "mistralai"}, "mistral_ai"),
        ({"llm.provider": "xai"}, "x_ai"),
        ({"llm.provider": "fireworks"}, "fireworks"),  # no GenAI name: kept as it is
        ({"llm.system": "vertexai"}, "gcp.vertex_ai"),
        ({"llm.system": "openai", "gen_ai.provider.name": "azure.ai.inference"}, "azure.ai.inference"),
    ],
)
def test_an_openinference_calls_provider_is_in_its_metrics(reader, traced, names, provider) -> None:
    # OpenInference names the provider llm.provider (the host) and llm.system (the model family)
    @step
    def call_model() -> None:
        _foreign_llm_span(traced, {**OPENINFERENCE_CALL, **names})

    @run
    def main() -> None:
        call_model()

    main()
    usage = points(reader, "gen_ai.client.token.usage")
    assert {a["gen_ai.provider.name"] for a, _ in usage} == {provider}
    [(attributes, count)] = durations(reader)
    assert count == 1 and attributes["gen_ai.provider.name"] == provider
    costs = points(reader, "multirun.cost")
    assert {a["gen_ai.provider.name"] for a, _ in costs} == {provider}


def _refused_by(limit: str, traced) -> None:  # type: ignore[no-untyped-def]
    """A run stopped by ``limit`` at its third step (its first two spend 60 tokens, $0.3, 3 s)."""
    from multirun import agent
    from multirun.context import get_current_run_context

    @step(kind=StepKind.LLM_CALL, model="m")
    def ask() -> None:
        multirun.report_usage("m", input_tokens=60, cost_usd=0.3)
        traced.clock.now += 3

    @agent(name="helper")
    def helper() -> None:
        ask()

    budget = {
        "max_tokens": Budget(max_tokens=120),
        "max_cost_usd": Budget(max_cost_usd=0.6),
        "max_duration_seconds": Budget(max_duration_seconds=6),
        "max_sub_agents": Budget(max_sub_agents=1),
    }[limit]

    @run(name="stopped", budget=budget)
    def main() -> None:
        if limit == "max_sub_agents":
            helper()
            helper()
        else:
            ask()
            ask()
            ask()
        raise AssertionError(f"not stopped: {get_current_run_context().budget_status()}")

    with pytest.raises(BudgetExceededError) as raised:
        main()
    assert raised.value.limit == limit


@pytest.mark.parametrize("limit", ["max_tokens", "max_cost_usd", "max_duration_seconds", "max_sub_agents"])
def test_each_limit_is_counted_by_name_with_the_refused_step_as_exemplar(reader, traced, limit) -> None:
    _refused_by(limit, traced)
    [(attributes, point)] = points(reader, "multirun.budget.exceeded")
    assert (attributes, point.value) == (
        {"gen_ai.workflow.name": "stopped", "multirun.budget.limit": limit},
        1,
    )
    refused = [s for s in traced.spans() if s.attributes.get("multirun.policy.decision") == "abort"]
    assert [s.attributes["multirun.budget.exceeded_limit"] for s in refused] == [limit]
    [exemplar] = point.exemplars
    assert (exemplar.trace_id, exemplar.span_id) == (refused[0].context.trace_id, refused[0].context.span_id)
    decisions = {
        (a["multirun.policy.decision"], a.get("multirun.policy.rule")): p.value
        for a, p in points(reader, "multirun.policy.decisions")
    }
    assert decisions == {("abort", "budget"): 1}


def test_fallback_and_circuit_breaker_decisions_are_counted_by_decision_and_rule(reader, traced) -> None:
    from multirun.errors import PolicyViolation
    from multirun.models.policy import CircuitBreakerRule, DegradationTrigger, GracefulDegradationRule

    @step(kind=StepKind.LLM_CALL, model="big")
    def ask() -> None:
        multirun.report_usage("big", input_tokens=300, cost_usd=0.0)

    @step(kind=StepKind.TOOL_CALL)
    def fetch() -> None:
        raise ConnectionError("down")

    @run(
        name="degraded",
        budget=Budget(max_tokens=1000),
        policy=Policy(
            graceful_degradation=GracefulDegradationRule(
                fallback_model="small", trigger=DegradationTrigger.TOKEN_PERCENTAGE, threshold=50
            ),
            circuit_breaker=CircuitBreakerRule(failure_threshold=2, recovery_time_seconds=60),
        ),
    )
    def main() -> None:
        for _ in range(3):
            ask()  # the third, at 60% of the tokens, falls back
        for _ in range(3):
            with pytest.raises((ConnectionError, PolicyViolation)):
                fetch()  # the third finds the circuit open

    main()
    decisions = {
        (a["multirun.policy.decision"], a.get("multirun.policy.rule")): p.value
        for a, p in points(reader, "multirun.policy.decisions")
    }
    assert decisions == {("fallback", "graceful_degradation"): 1, ("abort", "circuit_breaker"): 1}
    usage = {a["gen_ai.request.model"]: p.count for a, p in points(reader, "gen_ai.client.token.usage")}
    assert usage == {"big": 2, "small": 1}  # the input of each call (no output reported)


def test_usage_and_cost_exemplars_lead_to_the_llm_step_that_reported_them(reader, traced) -> None:
    @step(kind=StepKind.LLM_CALL, model="gpt-4o-mini")
    def ask() -> None:
        multirun.report_usage("gpt-4o-mini", input_tokens=10, output_tokens=5, provider="openai")

    @run
    def main() -> None:
        ask()

    main()
    llm = traced.span("chat gpt-4o-mini").context
    data = reader.get_metrics_data()  # one collection: each one takes the exemplars it exports
    exported = {m.name: m for r in data.resource_metrics for s in r.scope_metrics for m in s.metrics}
    for name in ("gen_ai.client.token.usage", "multirun.cost", "gen_ai.client.operation.duration"):
        for point in exported[name].data.data_points:
            assert [(e.trace_id, e.span_id) for e in point.exemplars] == [(llm.trace_id, llm.span_id)], name


def test_exemplars_of_a_step_made_by_hand_lead_to_its_span(reader, traced) -> None:
    # a step made by hand is never the current span: its measurements must still point at it,
    # not at the run around it, so a slow bucket or a failure leads to the step itself
    from multirun.context import get_current_agent_context

    @run
    def main() -> None:
        agent_ctx = get_current_agent_context()
        asked = agent_ctx.start_step("ask", kind=StepKind.LLM_CALL, model="gpt-4o-mini")
        asked.complete(None, tokens_used=10, cost_usd=0.01)
        agent_ctx.start_step("fetch", kind=StepKind.TOOL_CALL).fail(ConnectionError("down"))

    main()
    ask, fetch = traced.span("chat gpt-4o-mini").context, traced.span("execute_tool fetch").context
    data = reader.get_metrics_data()  # one collection: each one takes the exemplars it exports
    exported = {m.name: m for r in data.resource_metrics for s in r.scope_metrics for m in s.metrics}
    led_to = {
        (name, dict(point.attributes).get("multirun.step.kind")): [
            (e.trace_id, e.span_id) for e in point.exemplars
        ]
        for name in ("gen_ai.client.operation.duration", "multirun.cost", "multirun.step.duration")
        for point in exported[name].data.data_points
    }
    assert led_to == {
        ("gen_ai.client.operation.duration", None): [(ask.trace_id, ask.span_id)],
        ("multirun.cost", None): [(ask.trace_id, ask.span_id)],
        ("multirun.step.duration", "llm_call"): [(ask.trace_id, ask.span_id)],
        ("multirun.step.duration", "tool_call"): [(fetch.trace_id, fetch.span_id)],
    }
