"""Bad input is refused early with an error that names it; broken telemetry never breaks a run.

Reference 000 (decorator parameters), 001 (Budget fields), DESIGN.md
("errors with messages that say what to do"; "Telemetry never breaks the
agent: an exporter that fails ... costs at most bounded memory and a log line").
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pydantic
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import multirun
from multirun import agent, checkpoint, run, step
from multirun import client as client_module
from multirun.context import get_current_run_context
from multirun.errors import ConfigurationError
from multirun.models import Budget, Run, RunStatus, StepKind
from multirun.models.policy import RetryRule
from multirun.telemetry.local_files import read_spans

# ---------------------------------------------------------------------------
# bad input, refused at decoration time


def test_budget_with_negative_max_tokens_is_refused() -> None:
    with pytest.raises((pydantic.ValidationError, ConfigurationError), match="max_tokens"):
        Budget(max_tokens=-1)


def test_budget_with_zero_max_cost_is_refused() -> None:
    with pytest.raises((pydantic.ValidationError, ConfigurationError), match="max_cost_usd"):
        Budget(max_cost_usd=0)


def test_run_with_string_budget_is_refused_naming_budget() -> None:
    with pytest.raises(ConfigurationError, match="budget"):

        @run(budget="x")  # type: ignore[arg-type]
        def main() -> None:
            return None


def test_run_with_invalid_budget_dict_is_refused_naming_budget() -> None:
    with pytest.raises(ConfigurationError, match="budget") as info:

        @run(budget={"max_tokens": -1})
        def main() -> None:
            return None

    assert "max_tokens" in str(info.value)


def test_a_model_dict_refused_by_pydantic_is_one_line_naming_the_field() -> None:
    with pytest.raises(ConfigurationError) as info:
        run(budget={"max_tokens": -1, "max_stepz": 3})
    assert str(info.value) == (
        "@run(budget=...): max_tokens: Input should be greater than 0, got -1; "
        "max_stepz is not a field of Budget "
        "(use max_tokens, max_cost_usd, max_steps, max_duration_seconds, max_sub_agents)"
    )
    with pytest.raises(ConfigurationError, match=r"^@run\(policy=\.\.\.\): retry\.max_attempts: "):
        run(policy={"retry": {"max_attempts": 0}})


def test_run_with_non_bool_checkpoint_on_error_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="checkpoint_on_error"):

        @run(checkpoint_on_error="yes")  # type: ignore[arg-type]
        def main() -> None:
            return None


def test_step_with_negative_retry_is_refused_naming_retry() -> None:
    with pytest.raises(ConfigurationError, match="retry"):

        @step(retry=-1)
        def work() -> None:
            return None


def test_step_with_non_integer_retry_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="retry"):

        @step(retry="3")  # type: ignore[arg-type]
        def work() -> None:
            return None


def test_step_with_negative_retry_delay_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="retry_delay"):

        @step(retry=1, retry_delay=-0.5)
        def work() -> None:
            return None


@pytest.mark.parametrize("param", ["retry_delay", "retry_max_delay"])
def test_a_retry_delay_longer_than_a_clock_can_sleep_is_refused_naming_it(param: str) -> None:
    # time.sleep refuses ~292 years: the step failed "after 1 attempt" with that OverflowError
    # in place of its own error
    with pytest.raises(ConfigurationError, match=rf"^@step\({param}=\.\.\.\) must be .*at most 1e\+09"):

        @step(retry=1, **{param: 1e10})
        def work() -> None:
            return None

    @step(retry=1, retry_delay=1e9, retry_max_delay=1e9)  # about 31 years: as a rate limit allows
    def waits_long() -> None:
        return None


@pytest.mark.parametrize("field", ["base_delay_seconds", "max_delay_seconds"])
def test_a_retry_rule_delay_longer_than_a_clock_can_sleep_is_refused_naming_it(field: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=rf"{field}\n.*less than or equal to 1000000000"):
        RetryRule(**{field: 1e10})


def test_a_retry_delay_above_its_cap_is_refused_naming_both() -> None:
    # the cap wins: a step asking for 120 s between attempts waited 60 s, without a word
    with pytest.raises(ConfigurationError, match=r"^@step\(retry_delay=\.\.\.\) .*120.*retry_max_delay.*60"):

        @step(retry=2, retry_delay=120)
        def work() -> None:
            return None

    @step(retry=2, retry_delay=120, retry_max_delay=120)
    def waits_as_asked() -> None:
        return None


def test_a_retry_rule_base_delay_above_its_cap_is_refused_naming_both() -> None:
    with pytest.raises(pydantic.ValidationError, match=r"base_delay_seconds .*120.*max_delay_seconds.*60"):
        RetryRule(base_delay_seconds=120)
    assert RetryRule(base_delay_seconds=120, max_delay_seconds=120).base_delay_seconds == 120


@pytest.mark.parametrize(
    "options",
    [{"retry": 3, "retry_max_delay": 0.5}, {"retry_max_delay": 0}, {"retry_delay": 5, "retry_max_delay": 1}],
)
def test_a_retry_delay_cap_below_a_delay_no_one_gave_is_accepted(options: dict[str, Any]) -> None:
    """A cap under the default delay (1 s) lowers it, as the reference has it: it was refused,
    blaming a retry_delay the user never gave. Without retries (retry=0), no delay is used."""

    @step(**options)
    def work() -> None:
        return None


def test_a_retry_rule_cap_below_the_default_base_delay_is_accepted() -> None:
    assert RetryRule(max_delay_seconds=0.5).max_delay_seconds == 0.5
    assert RetryRule(max_delay_seconds=0).max_delay_seconds == 0


def test_a_retry_rule_s_delays_assigned_one_by_one_are_each_checked() -> None:
    """Each assignment is checked on its own: to raise both delays, the cap first (a base above
    the cap it has is refused, and the rule stays as it was); to lower both, the base first."""
    rule = RetryRule()
    rule.max_delay_seconds = 0.5  # below the default base: lowers it
    rule.max_delay_seconds = 120
    rule.base_delay_seconds = 90
    with pytest.raises(pydantic.ValidationError, match=r"base_delay_seconds .*150.*max_delay_seconds.*120"):
        rule.base_delay_seconds = 150
    assert (rule.base_delay_seconds, rule.max_delay_seconds) == (90, 120)
    with pytest.raises(pydantic.ValidationError, match=r"base_delay_seconds .*90.*max_delay_seconds.*30"):
        rule.max_delay_seconds = 30  # below the base it was given
    rule.base_delay_seconds = 10
    rule.max_delay_seconds = 30
    assert (rule.base_delay_seconds, rule.max_delay_seconds) == (10, 30)


def test_step_with_unknown_retry_strategy_lists_allowed_values() -> None:
    with pytest.raises(ConfigurationError, match="retry_strategy") as info:

        @step(retry_strategy="fibonacci")  # type: ignore[arg-type]
        def work() -> None:
            return None

    message = str(info.value)
    assert "fibonacci" in message
    for allowed in ("constant", "linear", "exponential"):
        assert allowed in message


def test_step_with_unknown_kind_lists_allowed_values() -> None:
    with pytest.raises(ConfigurationError, match="kind") as info:

        @step(kind="llm")  # type: ignore[arg-type]
        def work() -> None:
            return None

    assert "llm_call" in str(info.value)
    assert "tool_call" in str(info.value)


def test_a_bad_option_on_a_lambda_is_named_before_its_missing_name() -> None:
    """The option the user got wrong is what the error names, whatever it decorates."""
    with pytest.raises(ConfigurationError, match=r"^@step\(kind=\.\.\.\)"):
        step(kind="llm")(lambda: None)  # type: ignore[call-overload]


def test_step_with_empty_name_is_refused_naming_name() -> None:
    with pytest.raises(ConfigurationError, match="name"):

        @step(name="")
        def work() -> None:
            return None


def test_step_applied_to_non_callable_is_refused() -> None:
    with pytest.raises(ConfigurationError) as info:
        step(42)  # type: ignore[call-overload]
    assert "42" in str(info.value)


@pytest.mark.parametrize("decorator", [run, agent, step, checkpoint])
def test_a_name_given_positionally_is_refused_saying_to_pass_name(decorator: Any) -> None:
    """@step("fetch") reads like @think("fetch"), which takes its name positionally."""
    name = decorator.__name__
    with pytest.raises(ConfigurationError, match=rf"use @{name}\(name='fetch'\)"):
        decorator("fetch")


def test_run_applied_to_non_callable_is_refused() -> None:
    with pytest.raises(ConfigurationError):
        run("not a function")  # type: ignore[call-overload]


def test_step_with_non_exception_retry_on_is_refused_naming_retry_on() -> None:
    with pytest.raises(ConfigurationError, match="retry_on"):

        @step(retry=1, retry_on=(int,))  # type: ignore[arg-type]
        def work() -> None:
            return None


def test_step_with_empty_model_is_refused_naming_model() -> None:
    with pytest.raises(ConfigurationError, match="model"):

        @step(kind=StepKind.LLM_CALL, model="")
        def work() -> None:
            return None


@pytest.mark.parametrize(
    ("decorator", "param"), [(run, "metadata"), (agent, "metadata"), (checkpoint, "extra_state")]
)
def test_a_dict_option_with_a_key_that_is_not_a_string_is_refused_naming_the_option(
    decorator: Any, param: str
) -> None:
    """Refused when decorating, not with pydantic's ValidationError (of Run or Agent, several
    lines) at every call, nor a key a checkpoint would turn into a string; one message for all."""
    name = decorator.__name__
    with pytest.raises(
        ConfigurationError,
        match=rf"^@{name}\({param}=\.\.\.\) must be a dict with string keys, got key 1 \(int\)$",
    ):
        decorator(**{param: {1: "first"}})
    with pytest.raises(
        ConfigurationError,
        match=rf"^@{name}\({param}=\.\.\.\) must be a dict with string keys, got list \['a'\]$",
    ):
        decorator(**{param: ["a"]})


def test_start_agent_refuses_bad_metadata_and_config_id_by_name_before_starting_it(traced) -> None:
    """As the decorators do: one line naming the argument, not pydantic's ValidationError of
    Agent, and no agent half started (counted as a sub-agent, listed in the run)."""

    @run(name="main")
    def main() -> None:
        ctx = get_current_run_context()
        with pytest.raises(
            ConfigurationError,
            match=r"^start_agent\(metadata=\.\.\.\) must be a dict with string keys, got key 1 \(int\)$",
        ):
            ctx.start_agent("helper", metadata={1: "first"})
        with pytest.raises(
            ConfigurationError, match=r"^start_agent: agent_config_id must be a string or None, got 7$"
        ):
            ctx.start_agent("helper", agent_config_id=7)  # type: ignore[arg-type]
        assert ctx.agents == []
        assert ctx.ledger.sub_agents == 0

    main()


def test_a_run_context_given_the_wrong_client_or_run_is_refused_naming_it(traced) -> None:
    """``RunContext(client=client, run=run)``, as reference 002 writes it: a run given as the
    first argument, or a dict for the run, is refused naming the argument, not an
    AttributeError from deep inside the first step."""
    from multirun.context import RunContext

    with pytest.raises(ConfigurationError, match=r"^RunContext\(client=\.\.\.\) must be a MultiRunClient"):
        RunContext(Run(name="x"))  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"^RunContext\(run=\.\.\.\) must be a Run, got dict"):
        RunContext(client=traced.client, run={"name": "x"})  # type: ignore[arg-type]


def test_a_step_started_by_hand_with_bad_arguments_is_refused_naming_them(traced) -> None:
    """``start_step`` and ``get_step_result`` name the argument they cannot take, as the
    decorators do, and start nothing."""
    from multirun.context import RunContext

    with RunContext(client=traced.client, run=Run(name="x")) as ctx:
        agent_ctx = ctx.default_agent
        with pytest.raises(ConfigurationError, match=r"^start_step\(kind=\.\.\.\) must be one of 'function'"):
            agent_ctx.start_step("s", kind="bogus")  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match=r"^get_step_result\(kind=\.\.\.\) must be one of "):
            agent_ctx.get_step_result("s", (), {}, kind="bogus")  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match=r"^start_step\(input_kwargs=\.\.\.\) must be a dict"):
            agent_ctx.start_step("s", input_args=(1,), input_kwargs=[1])  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match=r"^start_step\(input_args=\.\.\.\) must be a tuple"):
            agent_ctx.start_step("s", input_args="abc")  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match=r"^get_step_result\(kwargs=\.\.\.\) must be a dict"):
            agent_ctx.get_step_result("s", (), [1])  # type: ignore[arg-type]
        assert ctx.ledger.steps == 0
    assert [span.name for span in traced.spans()] == ["invoke_workflow x"]


def test_checkpoint_with_empty_result_key_is_refused_naming_result_key() -> None:
    with pytest.raises(ConfigurationError, match="result_key"):

        @checkpoint(result_key="")
        def work() -> None:
            return None


def test_configuration_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):

        @step(retry=-1)
        def work() -> None:
            return None


def test_init_with_negative_content_limit_is_refused_naming_content_limit(traced) -> None:
    with pytest.raises(ConfigurationError, match="content_limit"):
        multirun.init(tracer_provider=traced.provider, content_limit=-5)


def test_init_with_non_bool_capture_content_is_refused(traced) -> None:
    with pytest.raises(ConfigurationError, match="capture_content"):
        multirun.init(tracer_provider=traced.provider, capture_content="yes")  # type: ignore[arg-type]


def test_price_with_negative_value_is_refused_naming_field() -> None:
    with pytest.raises(ConfigurationError, match="input_per_mtok"):
        multirun.Price(input_per_mtok=-1, output_per_mtok=1)


def test_report_usage_with_negative_tokens_is_refused_naming_field(traced) -> None:
    with pytest.raises(ConfigurationError, match="input_tokens"):
        multirun.report_usage("gpt-4o-mini", input_tokens=-3)


@pytest.mark.parametrize(
    ("given", "named"),
    [
        ({"output_tokens": -1}, "output_tokens"),
        ({"cached_input_tokens": -1}, r"cache_read_tokens \(cached_input_tokens\)"),
        ({"cache_write_tokens": 2.0}, "cache_write_tokens"),
        ({"reasoning_tokens": True}, "reasoning_tokens"),
        ({"input_tokens": "12"}, "input_tokens"),
        ({"provider": 7}, "provider"),
        ({"output_tokens": 2**63}, "output_tokens"),  # past what OTLP and the shared ledger count
    ],
)
def test_report_usage_refuses_each_bad_count_or_name_naming_it(traced, given: dict, named: str) -> None:
    with pytest.raises(ConfigurationError, match=f"^{named} must be"):
        multirun.report_usage("gpt-4o-mini", **given)
    with pytest.raises(ConfigurationError, match=r"^model must be a string"):
        multirun.report_usage(3, input_tokens=1)  # type: ignore[arg-type]


def test_report_usage_with_an_empty_model_is_refused_naming_model(traced) -> None:
    # charged as model '', unpriced, and init(unpriced="fail") said to price '', which prices refuses
    @multirun.step(kind=StepKind.LLM_CALL, model="gpt-4o-mini")
    def ask() -> None:
        multirun.report_usage("", input_tokens=3)

    @multirun.run
    def main() -> None:
        ask()

    with pytest.raises(ConfigurationError, match=r"^model must be a non-empty string, or None .*got ''"):
        main()


@pytest.mark.parametrize("cost", [float("nan"), float("inf")])
def test_report_usage_with_a_cost_that_is_not_finite_is_refused_naming_cost(traced, cost: float) -> None:
    @multirun.run
    def main() -> None:
        multirun.report_usage("gpt-4o-mini", input_tokens=3, cost_usd=cost)

    with pytest.raises(ConfigurationError, match="cost_usd"):
        main()


# ---------------------------------------------------------------------------
# a fresh global TracerProvider, for init() without a provider of its own


def test_failed_init_does_not_install_a_global_provider(global_otel, tmp_path) -> None:
    with pytest.raises(ConfigurationError, match="content_limit"):
        multirun.init(local_dir=tmp_path / "mr", content_limit=-5)

    assert not isinstance(trace.get_tracer_provider(), TracerProvider)
    assert client_module._owned_provider is None
    assert client_module._configured is None


# ---------------------------------------------------------------------------
# telemetry never breaks the function


class RaisingExporter(SpanExporter):
    """An exporter that raises on every export; counts the attempts."""

    def __init__(self) -> None:
        self.calls = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.calls += 1
        raise ConnectionError("collector is down")

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


@pytest.fixture
def configured_reset() -> Iterator[None]:
    yield
    client_module._configured = None


def agent_program() -> Any:
    @step(kind=StepKind.LLM_CALL)
    def ask(q: str) -> str:
        multirun.report_usage("gpt-4o-mini", input_tokens=10, output_tokens=5)
        return q.upper()

    @step(retry=1, retry_delay=0.0)
    def tool(q: str) -> str:
        return q[::-1]

    @agent
    def worker(q: str) -> str:
        return ask(q) + tool(q)

    @run(budget=Budget(max_tokens=10_000))
    def main(q: str) -> str:
        return worker(q)

    return main


@pytest.mark.parametrize("processor_class", [BatchSpanProcessor, SimpleSpanProcessor])
def test_exporter_that_raises_does_not_change_result(configured_reset, processor_class, caplog) -> None:
    exporter = RaisingExporter()
    provider = TracerProvider()
    provider.add_span_processor(processor_class(exporter))
    multirun.init(tracer_provider=provider)
    main = agent_program()

    with caplog.at_level(logging.CRITICAL):
        assert main("abc") == "ABCcba"
        provider.force_flush()
    provider.shutdown()

    assert exporter.calls >= 1


async def test_exporter_that_raises_does_not_break_async_run(configured_reset) -> None:
    exporter = RaisingExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    multirun.init(tracer_provider=provider)

    @step
    async def work() -> int:
        return 41

    @run
    async def main() -> int:
        return await work() + 1

    assert await main() == 42
    provider.shutdown()
    assert exporter.calls == 2


def folder_that_becomes_a_file(path: Path) -> None:
    """Make a folder that init accepted unusable: from now on a file stands where it was."""
    shutil.rmtree(path, ignore_errors=True)
    path.write_text("not a folder any more")


def test_unwritable_local_dir_still_completes_the_run(global_otel, tmp_path, caplog) -> None:
    local_dir = tmp_path / "multirun"
    client = multirun.init(local_dir=local_dir)
    folder_that_becomes_a_file(local_dir)
    runs: list[Run] = []

    @step(checkpoint=True)
    def work() -> str:
        return "done"

    @checkpoint(name="after_all")
    def finish(x: str) -> str:
        return x + "!"

    @run
    def main() -> str:
        runs.append(get_current_run_context().run)
        return finish(work())

    with caplog.at_level(logging.WARNING, logger="multirun"):
        assert main() == "done!"
        client.force_flush(5_000)

    assert runs[0].status is RunStatus.COMPLETED
    assert local_dir.is_file()
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("multirun")]
    assert any("cannot write traces" in m for m in warnings), warnings
    assert any("checkpoint 'after_all'" in m for m in warnings), warnings


def test_unwritable_local_dir_keeps_the_runs_own_error(global_otel, tmp_path) -> None:
    local_dir = tmp_path / "multirun"
    multirun.init(local_dir=local_dir)
    folder_that_becomes_a_file(local_dir)

    @run(checkpoint_on_error=True)
    def main() -> None:
        raise KeyError("the real error")

    with pytest.raises(KeyError, match="the real error"):
        main()


# ---------------------------------------------------------------------------
# configuration that cannot work is refused by init, not lost at exit


@pytest.mark.parametrize(
    "endpoint",
    ["notaurl", "localhost:4318", "ftp://collector:4318", "http://", "http:///v1/traces", "http://h:port"],
)
def test_init_refuses_an_endpoint_that_is_not_an_http_url(global_otel, tmp_path, endpoint: str) -> None:
    with pytest.raises(ConfigurationError, match=r"^endpoint must be an http\(s\) URL") as info:
        multirun.init(endpoint=endpoint, local_dir=tmp_path / "mr")
    assert repr(endpoint) in str(info.value)
    assert "\n" not in str(info.value)
    assert client_module._configured is None
    assert not isinstance(trace.get_tracer_provider(), TracerProvider)


@pytest.mark.parametrize("variable", ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"])
def test_init_refuses_an_otlp_endpoint_variable_that_is_not_an_http_url(
    global_otel, tmp_path, monkeypatch, variable: str
) -> None:
    monkeypatch.setenv(variable, "notaurl")
    with pytest.raises(ConfigurationError, match=f"^{variable} must be an http"):
        multirun.init(local_dir=tmp_path / "mr")
    assert client_module._configured is None


def test_init_refuses_a_bad_metrics_endpoint_variable_it_would_export_to(
    global_otel, tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "collector:4318")
    with pytest.raises(ConfigurationError, match=r"^OTEL_EXPORTER_OTLP_METRICS_ENDPOINT must be"):
        multirun.init(local_dir=tmp_path / "mr", span_exporter=InMemorySpanExporter())
    multirun.init(local_dir=tmp_path / "mr", span_exporter=InMemorySpanExporter(), metrics=False)


def test_endpoint_variables_of_the_applications_own_provider_are_its_business(
    global_otel, tmp_path, monkeypatch
) -> None:
    # a gRPC exporter of the application's own accepts host:port; init exports nothing there
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "collector:4317")
    app_provider = TracerProvider()
    trace.set_tracer_provider(app_provider)
    client = multirun.init(local_dir=tmp_path / "mr", metrics=False)
    assert client.tracer_provider is app_provider
    app_provider.shutdown()


def test_init_accepts_http_and_https_endpoints(global_otel, tmp_path, monkeypatch) -> None:
    multirun.init(endpoint="https://otlp.example.com/otlp", local_dir=tmp_path / "mr", metrics=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://[::1]:4318")
    multirun.init(local_dir=tmp_path / "mr", metrics=False)


def test_init_refuses_a_local_dir_that_cannot_be_created(global_otel, tmp_path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for local_dir in (blocker, blocker / "multirun"):
        with pytest.raises(ConfigurationError, match=r"^local_dir must be a folder") as info:
            multirun.init(local_dir=local_dir)
        assert repr(str(local_dir)) in str(info.value)
    assert client_module._configured is None
    assert not isinstance(trace.get_tracer_provider(), TracerProvider)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_init_refuses_a_local_dir_under_proc(global_otel) -> None:
    with pytest.raises(ConfigurationError, match=r"^local_dir must be a folder .*'/proc/nope'"):
        multirun.init(local_dir="/proc/nope")
    with pytest.raises(ConfigurationError, match=r"^init_local: path must be a folder .*'/proc/nope'"):
        multirun.init_local("/proc/nope")


def test_init_local_refuses_a_path_that_cannot_be_created_naming_path(
    global_otel, tmp_path, monkeypatch
) -> None:
    # the user passed path, not local_dir: the message names what they can change
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigurationError, match=r"^init_local: path must be a folder") as info:
        multirun.init_local(blocker / "multirun")
    assert repr(str(blocker / "multirun")) in str(info.value)
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".multirun").write_text("not a folder")  # the default path
    with pytest.raises(ConfigurationError, match=r"^init_local: path must be a folder .*'\.multirun'"):
        multirun.init_local()
    assert client_module._configured is None


def test_init_local_takes_only_the_options_of_init(global_otel, tmp_path) -> None:
    with pytest.raises(TypeError, match="no_such_option"):
        multirun.init_local(tmp_path, no_such_option=1)
    with pytest.raises(TypeError, match="local_dir"):
        multirun.init_local(tmp_path, local_dir=tmp_path)
    assert client_module._configured is None


def test_init_refuses_a_multirun_dir_that_cannot_be_created_naming_the_variable(
    global_otel, tmp_path, monkeypatch
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("MULTIRUN_DIR", str(blocker / "multirun"))
    with pytest.raises(ConfigurationError, match=r"^MULTIRUN_DIR must be a folder"):
        multirun.init()


@pytest.mark.parametrize("as_uri", [False, True], ids=["path", "file-uri"])
def test_init_refuses_a_checkpoint_uri_that_is_a_file_naming_it(global_otel, tmp_path, as_uri: bool) -> None:
    # accepted, every checkpoint of every run would fail (a warning each): nothing to resume from
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    uri = blocker.as_uri() if as_uri else str(blocker)
    with pytest.raises(ConfigurationError, match=r"^checkpoint_uri: .*a file") as info:
        multirun.init(local_dir=tmp_path / "mr", checkpoint_uri=uri)
    assert str(blocker) in str(info.value)
    assert client_module._configured is None


def test_init_refuses_a_checkpoint_uri_variable_that_is_a_file_naming_it(
    global_otel, tmp_path, monkeypatch
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("MULTIRUN_CHECKPOINT_URI", str(blocker))
    with pytest.raises(ConfigurationError, match=r"^MULTIRUN_CHECKPOINT_URI: .*a file"):
        multirun.init(local_dir=tmp_path / "mr")


def test_init_creates_the_local_dir_it_is_given(global_otel, tmp_path) -> None:
    multirun.init(local_dir=tmp_path / "new" / "mr")
    assert (tmp_path / "new" / "mr").is_dir()


def test_a_refused_init_creates_no_local_dir(global_otel, tmp_path) -> None:
    with pytest.raises(ConfigurationError, match="content_limit"):
        multirun.init(local_dir=tmp_path / "mr", content_limit=-5)
    assert not (tmp_path / "mr").exists()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "0"),
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "many"),
        ("OTEL_BSP_SCHEDULE_DELAY", "0"),
        ("OTEL_BSP_SCHEDULE_DELAY", "-5"),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "0"),
    ],
)
def test_init_refuses_a_batch_variable_it_would_export_with_naming_it(
    global_otel, tmp_path, monkeypatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError, match=f"^{variable} must be an int") as info:
        multirun.init(local_dir=tmp_path / "mr")
    assert value in str(info.value)
    assert client_module._configured is None
    assert not isinstance(trace.get_tracer_provider(), TracerProvider)
    assert not (tmp_path / "mr").exists()


def test_a_batch_size_above_the_queue_size_exports_in_batches_of_the_queue(
    global_otel, tmp_path, monkeypatch
) -> None:
    # the SDK's batch processor refuses a batch larger than its queue (2048 by default)
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "5000")
    client = multirun.init(local_dir=tmp_path / "mr", metrics=False)
    assert agent_program()("q") == "Qq"
    assert client.force_flush()
    assert len(list(read_spans(tmp_path / "mr" / "traces"))) == 4


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OTEL_METRIC_EXPORT_INTERVAL", "0"),
        ("OTEL_METRIC_EXPORT_INTERVAL", "-1"),
        ("OTEL_METRICS_EXEMPLAR_FILTER", "sometimes"),
    ],
)
def test_init_refuses_a_metrics_variable_of_the_meter_provider_it_would_make(
    global_otel, tmp_path, monkeypatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError, match=f"^{variable} must be") as info:
        multirun.init(endpoint="http://127.0.0.1:9", local_dir=tmp_path / "mr")
    assert value in str(info.value)
    assert client_module._configured is None
    assert not isinstance(trace.get_tracer_provider(), TracerProvider)


def test_retry_on_an_error_that_is_never_retried_says_so() -> None:
    """A step never retries KeyboardInterrupt, SystemExit or a cancellation (retry_on lists
    Exception classes, reference 000): asking for it is refused, not silently ignored."""
    with pytest.raises(ConfigurationError, match="retry_on") as info:

        @step(retry=2, retry_on=KeyboardInterrupt)
        def work() -> None:
            return None

    # it said "KeyboardInterrupt is never retried (nor is KeyboardInterrupt, SystemExit or ...)"
    assert str(info.value) == (
        "@step(retry_on=...) must list Exception classes: KeyboardInterrupt is not one, and is never retried"
    )
