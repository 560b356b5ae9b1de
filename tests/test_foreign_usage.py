"""Usage reported on spans of other instrumentations (OpenLLMetry, OpenInference) inside a step."""

from __future__ import annotations

import logging

import pytest

import multirun.usage
from multirun import run, step
from multirun.errors import BudgetExceededError
from multirun.models import Budget


def foreign_span(traced, name: str, attributes: dict) -> None:
    """A span as another instrumentation would open it inside the current step."""
    tracer = traced.provider.get_tracer("some.other.instrumentation")
    with tracer.start_as_current_span(name, attributes=attributes):
        pass


@pytest.mark.parametrize(
    "attributes",
    [
        {
            "gen_ai.usage.input_tokens": 120,
            "gen_ai.usage.output_tokens": 30,
            "gen_ai.request.model": "gpt-4o",
        },
        # OpenLLMetry's older names
        {"gen_ai.usage.prompt_tokens": 120, "gen_ai.usage.completion_tokens": 30, "gen_ai.system": "openai"},
        # OpenInference
        {"llm.token_count.prompt": 120, "llm.token_count.completion": 30, "llm.model_name": "gpt-4o"},
    ],
    ids=["genai", "openllmetry", "openinference"],
)
def test_usage_on_foreign_spans_is_charged_to_the_enclosing_step(traced, attributes) -> None:
    @step
    def call_model() -> None:
        foreign_span(traced, "llm call", attributes)

    @run
    def main() -> None:
        call_model()
        call_model()

    main()
    step_span = traced.named("step call_model")[0]
    assert step_span.attributes["multirun.tokens_used"] == 150
    assert "gen_ai.usage.input_tokens" not in step_span.attributes  # the foreign span carries it
    assert traced.span("invoke_workflow main").attributes["multirun.tokens_used"] == 300


def test_a_known_model_on_a_foreign_span_is_priced(traced) -> None:
    @step
    def call_model() -> None:
        foreign_span(
            traced, "chat", {"gen_ai.usage.input_tokens": 1_000_000, "gen_ai.request.model": "gpt-4o-mini"}
        )

    @run
    def main() -> None:
        call_model()

    main()
    assert traced.span("invoke_workflow main").attributes["multirun.cost_usd"] == pytest.approx(0.15)


def test_an_openinference_call_is_priced_at_its_providers_price(traced) -> None:
    # gpt-oss-120b costs $0.039 + $0.18 per million tokens at OpenAI, $0.35 + $0.75 at Cerebras
    def cost_of(attributes: dict) -> float:
        @step
        def call_model() -> None:
            usage = {"llm.token_count.prompt": 1_000_000, "llm.token_count.completion": 1_000_000}
            foreign_span(traced, "ChatCompletion", {"llm.model_name": "gpt-oss-120b", **usage, **attributes})

        @run
        def main() -> None:
            call_model()

        main()
        return traced.named("invoke_workflow main")[-1].attributes["multirun.cost_usd"]

    assert cost_of({}) == pytest.approx(0.039 + 0.18)  # by the model name alone: OpenAI's
    assert cost_of({"llm.provider": "cerebras"}) == pytest.approx(0.35 + 0.75)


@pytest.mark.parametrize(
    "host",
    [
        {"server.address": "api.groq.com"},  # the GenAI conventions' (openai-v2's)
        {"gen_ai.openai.api_base": "https://api.groq.com/openai/v1"},  # OpenLLMetry's
    ],
    ids=["server.address", "openllmetry api_base"],
)
def test_a_call_through_the_openai_sdk_to_another_server_is_priced_at_that_servers_price(
    traced, host
) -> None:
    # The OpenAI SDK talking to Groq: its instrumentation names the provider "openai" (the SDK's)
    # and gives the host. By its name alone, Groq's DeepSeek distill of Llama was priced as
    # DeepSeek's own reasoner ($0.55 + $2.19 per million tokens, not Groq's $0.75 + $0.99).
    @step
    def call_model() -> None:
        foreign_span(
            traced,
            "chat deepseek-r1-distill-llama-70b",
            {
                "gen_ai.operation.name": "chat",
                "gen_ai.provider.name": "openai",
                "gen_ai.response.model": "deepseek-r1-distill-llama-70b",
                "gen_ai.usage.input_tokens": 1_000_000,
                "gen_ai.usage.output_tokens": 1_000_000,
                **host,
            },
        )

    @run
    def main() -> None:
        call_model()

    main()
    assert traced.span("invoke_workflow main").attributes["multirun.cost_usd"] == pytest.approx(0.75 + 0.99)


def test_a_call_to_openai_or_to_an_unknown_host_is_priced_by_its_provider_name(traced) -> None:
    def cost_of(address: str) -> float:
        @step
        def call_model() -> None:
            usage = {"gen_ai.usage.input_tokens": 1_000_000, "gen_ai.usage.output_tokens": 1_000_000}
            attributes = {"gen_ai.provider.name": "openai", "gen_ai.response.model": "gpt-4o-mini"}
            foreign_span(traced, "chat", {**attributes, **usage, "server.address": address})

        @run
        def main() -> None:
            call_model()

        main()
        return traced.named("invoke_workflow main")[-1].attributes["multirun.cost_usd"]

    assert cost_of("api.openai.com") == pytest.approx(0.15 + 0.60)
    assert cost_of("127.0.0.1") == pytest.approx(0.15 + 0.60)  # a proxy, say: OpenAI's price
    assert cost_of("myresource.openai.azure.com") == pytest.approx(0.15 + 0.60)  # Azure's, the same


@pytest.mark.parametrize("cost", [float("nan"), float("inf"), -0.5, "free"])
def test_a_bad_cost_on_a_foreign_span_is_ignored_and_its_tokens_priced_here(traced, cost) -> None:
    @step
    def call_model() -> None:
        attributes = {
            "gen_ai.usage.input_tokens": 1_000_000,
            "gen_ai.request.model": "gpt-4o-mini",
            "gen_ai.usage.cost.amount": cost,
        }
        foreign_span(traced, "chat", attributes)

    @run
    def main() -> None:
        call_model()

    main()
    run_span = traced.span("invoke_workflow main")
    assert run_span.attributes["multirun.tokens_used"] == 1_000_000
    assert run_span.attributes["multirun.cost_usd"] == pytest.approx(0.15)


def test_a_cost_on_a_foreign_span_is_used_as_is(traced) -> None:
    @step
    def call_model() -> None:
        attributes = {
            "gen_ai.usage.input_tokens": 1_000_000,
            "gen_ai.request.model": "gpt-4o-mini",
            "gen_ai.usage.cost.amount": 0.02,
        }
        foreign_span(traced, "chat", attributes)

    @run
    def main() -> None:
        call_model()

    main()
    assert traced.span("invoke_workflow main").attributes["multirun.cost_usd"] == 0.02


def test_foreign_usage_counts_against_the_budget(traced) -> None:
    calls = {"n": 0}

    @step
    def call_model() -> None:
        calls["n"] += 1
        foreign_span(traced, "chat", {"llm.token_count.prompt": 400, "llm.token_count.completion": 100})

    @run(budget=Budget(max_tokens=1_200))
    def main() -> None:
        for _ in range(5):
            call_model()

    with pytest.raises(BudgetExceededError, match="max_tokens"):
        main()
    assert calls["n"] == 3  # 500, 1000, 1500: the fourth step is refused


def test_foreign_spans_outside_any_run_are_left_alone(traced) -> None:
    foreign_span(traced, "chat", {"gen_ai.usage.input_tokens": 10, "gen_ai.usage.output_tokens": 5})
    assert [s.name for s in traced.spans()] == ["chat"]


def test_a_foreign_span_that_never_ends_does_not_keep_its_run_alive(traced) -> None:
    import gc
    import weakref

    from multirun.context import get_current_run_context

    runs: list[weakref.ref] = []

    @step
    def read_half_a_stream() -> None:
        # an instrumented stream abandoned half-read: its span is started and never ended
        traced.provider.get_tracer("some.other.instrumentation").start_span("chat gpt-4o")

    @run
    def main() -> None:
        runs.append(weakref.ref(get_current_run_context()))
        read_half_a_stream()

    main()
    gc.collect()
    assert runs[0]() is None


def test_spans_that_never_end_are_forgotten_past_a_bound_and_later_ones_still_charge(traced) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    import multirun

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    multirun.init(tracer_provider=provider)
    usage = provider._multirun_usage_processor  # the one init() installed
    usage._max_open = 20  # instead of 100,000
    other = provider.get_tracer("some.other.instrumentation")

    @step
    def call_model(finish: bool) -> None:
        span = other.start_span("chat", attributes={"gen_ai.usage.input_tokens": 7})
        if finish:
            span.end()

    @run
    def main() -> None:
        for _ in range(100):
            call_model(False)
        call_model(True)

    main()
    assert len(usage._open) <= 20
    run_span = next(s for s in exporter.get_finished_spans() if s.name == "invoke_workflow main")
    assert run_span.attributes["multirun.tokens_used"] == 7


def test_a_foreign_span_ending_after_its_step_returned_is_still_charged_to_the_run(traced) -> None:
    import multirun

    # no finished step kept: only the usage processor's entry ties the span to its step
    multirun.init(tracer_provider=traced.provider, step_history=0)
    other = traced.provider.get_tracer("some.other.instrumentation")

    @step
    def open_stream():  # type: ignore[no-untyped-def]
        # returns the stream; its instrumentation ends the span when the caller has read it
        return other.start_span("chat gpt-4o", attributes={"gen_ai.request.model": "gpt-4o"})

    @run
    def main() -> None:
        stream = open_stream()
        stream.set_attribute("gen_ai.usage.input_tokens", 40)
        stream.end()

    main()
    assert traced.span("invoke_workflow main").attributes["multirun.tokens_used"] == 40


def test_usage_under_the_llm_usage_names_is_charged(traced) -> None:
    # OpenLLMetry's first names, still written by Traceloop-style SDKs and hand-made spans
    @step
    def call_model() -> None:
        foreign_span(traced, "llm call", {"llm.usage.prompt_tokens": 120, "llm.usage.completion_tokens": 30})

    @run
    def main() -> None:
        call_model()

    main()
    assert traced.span("invoke_workflow main").attributes["multirun.tokens_used"] == 150


@pytest.mark.parametrize(
    "attributes",
    [
        # OpenLLMetry: prompt tokens include the cached ones, as in the GenAI conventions
        {
            "gen_ai.usage.prompt_tokens": 10_000,
            "gen_ai.usage.completion_tokens": 1000,
            "gen_ai.usage.cache_read_input_tokens": 4000,
            "gen_ai.request.model": "gpt-4o-mini",
        },
        # OpenInference
        {
            "llm.token_count.prompt": 10_000,
            "llm.token_count.completion": 1000,
            "llm.token_count.prompt_details.cache_read": 4000,
            "llm.model_name": "gpt-4o-mini",
        },
    ],
    ids=["openllmetry", "openinference"],
)
def test_cached_input_on_foreign_spans_is_priced_at_the_cache_read_price(traced, attributes) -> None:
    import genai_prices

    @step
    def call_model() -> None:
        foreign_span(traced, "llm call", attributes)

    @run
    def main() -> None:
        call_model()

    main()
    usage = genai_prices.Usage(input_tokens=10_000, output_tokens=1000, cache_read_tokens=4000)
    expected = float(genai_prices.calc_price(usage, "gpt-4o-mini").total_price)
    run_attributes = traced.span("invoke_workflow main").attributes
    assert run_attributes["multirun.tokens_used"] == 11_000
    assert run_attributes["multirun.cost_usd"] == pytest.approx(expected, rel=1e-9)


def test_a_foreign_span_ending_after_its_sub_run_ended_is_charged_to_the_parent_run(traced) -> None:
    other = traced.provider.get_tracer("some.other.instrumentation")
    streams = []

    @run
    def sub() -> None:
        # a stream opened in the sub-run and read by the parent after the sub-run returned
        streams.append(other.start_span("chat gpt-4o", attributes={"gen_ai.request.model": "gpt-4o"}))

    @step
    def consume() -> None:
        sub()
        streams[0].set_attribute("gen_ai.usage.input_tokens", 40)
        streams[0].set_attribute("gen_ai.usage.output_tokens", 2)
        streams[0].end()

    @run
    def main() -> None:
        consume()

    main()
    assert traced.span("invoke_workflow main").attributes["multirun.tokens_used"] == 42
    assert traced.span("step consume").attributes["multirun.tokens_used"] == 42


def wrapper_copying_totals(traced, name: str):  # type: ignore[no-untyped-def]
    """An agent or workflow span of another instrumentation that sets its children's usage totals
    on itself when it ends (OpenLLMetry's and OpenInference's agent spans do)."""
    tracer = traced.provider.get_tracer("some.agent.framework")
    return tracer.start_as_current_span(name)


def test_a_wrapper_copying_the_usage_of_spans_inside_nested_steps_is_not_charged_again(traced) -> None:
    @step
    def call_model() -> None:
        foreign_span(traced, "chat", {"gen_ai.usage.input_tokens": 100, "gen_ai.usage.output_tokens": 20})

    @step
    def plan() -> None:
        call_model()

    @run
    def main() -> None:
        with wrapper_copying_totals(traced, "agent researcher") as wrapper:
            plan()
            plan()
            wrapper.set_attributes({"gen_ai.usage.input_tokens": 200, "gen_ai.usage.output_tokens": 40})

    main()
    assert traced.span("invoke_workflow main").attributes["multirun.tokens_used"] == 240


def test_a_wrapper_copying_usage_a_step_reported_itself_is_not_charged_again(traced) -> None:
    import multirun

    @step
    def call_model() -> None:
        multirun.report_usage("gpt-4o", input_tokens=100, output_tokens=20)

    @run
    def main() -> None:
        with wrapper_copying_totals(traced, "agent researcher") as wrapper:
            call_model()
            wrapper.set_attributes({"llm.token_count.prompt": 100, "llm.token_count.completion": 20})

    main()
    assert traced.span("invoke_workflow main").attributes["multirun.tokens_used"] == 120


def test_a_wrapper_copying_the_usage_of_a_sub_run_inside_it_is_not_charged_again(traced) -> None:
    @step
    def call_model() -> None:
        foreign_span(traced, "chat", {"gen_ai.usage.input_tokens": 100, "gen_ai.usage.output_tokens": 20})

    @run
    def sub() -> None:
        call_model()

    @step
    def delegate() -> None:
        with wrapper_copying_totals(traced, "agent researcher") as wrapper:
            sub()
            wrapper.set_attributes({"gen_ai.usage.input_tokens": 100, "gen_ai.usage.output_tokens": 20})

    @run
    def main() -> None:
        delegate()

    main()
    assert traced.span("step delegate").attributes["multirun.tokens_used"] == 120
    assert traced.span("invoke_workflow main").attributes["multirun.tokens_used"] == 120


def test_a_wrapper_around_steps_that_charged_nothing_is_charged(traced) -> None:
    @step
    def think() -> None:
        pass

    @run
    def main() -> None:
        with wrapper_copying_totals(traced, "chat gpt-4o") as llm_call:
            think()
            llm_call.set_attributes({"gen_ai.usage.input_tokens": 100, "gen_ai.usage.output_tokens": 20})

    main()
    assert traced.span("invoke_workflow main").attributes["multirun.tokens_used"] == 120


@pytest.mark.parametrize(
    ("bad_key", "bad_value"),
    [
        ("gen_ai.usage.cache_read.input_tokens", float("nan")),
        ("gen_ai.usage.cache_read.input_tokens", -5),
        ("gen_ai.usage.reasoning.output_tokens", "many"),
        ("gen_ai.usage.output_tokens", float("inf")),
        ("gen_ai.usage.output_tokens", -1),
        ("gen_ai.usage.output_tokens", 2**64),  # past what a span's 64-bit integer holds
        ("gen_ai.usage.cache_read.input_tokens", 2**63),
    ],
)
def test_a_bad_token_count_on_a_foreign_span_costs_only_that_count(
    traced, caplog, bad_key, bad_value
) -> None:
    @step
    def call_model() -> None:
        attributes = {
            "gen_ai.usage.input_tokens": 1_000_000,
            "gen_ai.usage.output_tokens": 0,
            "gen_ai.request.model": "gpt-4o-mini",
            bad_key: bad_value,
        }
        foreign_span(traced, "chat", attributes)

    @run
    def main() -> None:
        call_model()

    multirun.usage._warned_counts.clear()
    with caplog.at_level(logging.WARNING, logger="multirun"):
        main()
    run_span = traced.span("invoke_workflow main")
    assert run_span.attributes["multirun.tokens_used"] == 1_000_000  # the input is still charged
    assert run_span.attributes["multirun.cost_usd"] == pytest.approx(0.15)
    assert f"{bad_key}=" in caplog.text  # the bad count is named


def test_a_bad_token_count_on_foreign_spans_is_logged_once_per_attribute(traced, caplog) -> None:
    """A misbehaving instrumentation's every span would repeat it: one warning per attribute."""

    @step
    def call_model(bad_key: str) -> None:
        foreign_span(traced, "chat", {"gen_ai.usage.input_tokens": 10, bad_key: -1})

    @run
    def main() -> None:
        call_model("gen_ai.usage.output_tokens")
        call_model("gen_ai.usage.output_tokens")
        call_model("gen_ai.usage.cache_read.input_tokens")

    multirun.usage._warned_counts.clear()
    with caplog.at_level(logging.WARNING, logger="multirun"):
        main()
    warned = [r.getMessage() for r in caplog.records if "no token count" in r.getMessage()]
    assert len(warned) == 2
    assert "gen_ai.usage.output_tokens=-1" in warned[0]
    assert "gen_ai.usage.cache_read.input_tokens=-1" in warned[1]
    assert traced.span("invoke_workflow main").attributes["multirun.tokens_used"] == 30


def test_a_token_count_a_foreign_span_gives_as_a_numeric_string_is_charged(traced, caplog) -> None:
    @step
    def call_model() -> None:
        foreign_span(traced, "chat", {"gen_ai.usage.input_tokens": "120", "gen_ai.usage.output_tokens": 30})

    @run
    def main() -> None:
        call_model()

    with caplog.at_level(logging.WARNING, logger="multirun"):
        main()
    assert traced.span("invoke_workflow main").attributes["multirun.tokens_used"] == 150
    assert "no token count" not in caplog.text
