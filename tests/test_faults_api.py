"""Bad input at the API (issue 8, cases 24-25): every public parameter refused early with an error
that names it and what it accepts; huge content truncated without a memory blow-up."""

from __future__ import annotations

import dataclasses
import re
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydantic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

import multirun
from multirun import agent, checkpoint, run, step
from multirun import client as client_module
from multirun.context import get_current_agent_context, get_current_run_context
from multirun.errors import ConfigurationError
from multirun.models import Budget, Policy, StepKind
from multirun.models.policy import (
    BudgetRule,
    CircuitBreakerRule,
    GracefulDegradationRule,
    RateLimitRule,
    RetryRule,
)

SAYS_WHAT_IS_ACCEPTED = re.compile(
    r"must|should|one of|use |expected|valid|accepts|available|needs|at least|set |pass ", re.IGNORECASE
)


def refused(action: Callable[[], Any], parameter: str) -> str:
    """``action()`` raises a configuration error (or a pydantic one) naming ``parameter``."""
    with pytest.raises((ConfigurationError, pydantic.ValidationError)) as info:
        action()
    message = str(info.value)
    assert parameter in message, message
    assert SAYS_WHAT_IS_ACCEPTED.search(message), message
    assert isinstance(info.value, ValueError)  # code that already catches ValueError keeps working
    return message


def fn() -> None:
    return None


# ---------------------------------------------------------------------------
# 24. decorators: refused at decoration time

DECORATOR_CASES: list[tuple[str, Callable[..., Any], dict[str, Any], str]] = [
    ("run", run, {"name": 5}, "name"),
    ("run", run, {"name": ""}, "name"),
    ("run", run, {"budget": "x"}, "budget"),
    ("run", run, {"budget": {"max_tokens": -1}}, "max_tokens"),
    ("run", run, {"budget": {"max_tokenz": 5}}, "max_tokenz"),
    ("run", run, {"policy": "x"}, "policy"),
    ("run", run, {"policy": {"retry": {"max_attempts": 0}}}, "max_attempts"),
    ("run", run, {"checkpoint_on_error": "yes"}, "checkpoint_on_error"),
    ("run", run, {"metadata": ["a"]}, "metadata"),
    ("agent", agent, {"name": 5}, "name"),
    ("agent", agent, {"agent_config_id": 5}, "agent_config_id"),
    ("agent", agent, {"metadata": "x"}, "metadata"),
    ("step", step, {"name": 5}, "name"),
    ("step", step, {"name": "x" * 300}, "name"),
    ("step", step, {"kind": "llm"}, "kind"),
    ("step", step, {"retry": -1}, "retry"),
    ("step", step, {"retry": "3"}, "retry"),
    ("step", step, {"retry": True}, "retry"),
    ("step", step, {"retry_delay": -1}, "retry_delay"),
    ("step", step, {"retry_delay": "1s"}, "retry_delay"),
    ("step", step, {"retry_max_delay": -1.0}, "retry_max_delay"),
    ("step", step, {"retry_delay": float("inf")}, "retry_delay"),  # was accepted, then never retried
    ("step", step, {"retry_max_delay": float("inf")}, "retry_max_delay"),
    ("step", step, {"retry_strategy": "fibonacci"}, "retry_strategy"),
    ("step", step, {"retry_on": (int,)}, "retry_on"),
    ("step", step, {"retry_on": "ConnectionError"}, "retry_on"),
    ("step", step, {"retry_on": KeyboardInterrupt}, "retry_on"),  # was accepted, never retried
    ("step", step, {"retry_on": (ConnectionError, SystemExit)}, "retry_on"),
    ("step", step, {"checkpoint": "yes"}, "checkpoint"),
    ("step", step, {"idempotent": "no"}, "idempotent"),
    ("step", step, {"check_budget": 1}, "check_budget"),
    ("step", step, {"model": ""}, "model"),
    ("step", step, {"model": 5}, "model"),
    ("checkpoint", checkpoint, {"name": 5}, "name"),
    ("checkpoint", checkpoint, {"capture_result": "yes"}, "capture_result"),
    ("checkpoint", checkpoint, {"result_key": ""}, "result_key"),
    ("checkpoint", checkpoint, {"result_key": 5}, "result_key"),
    ("checkpoint", checkpoint, {"extra_state": "x"}, "extra_state"),
    ("checkpoint", checkpoint, {"extra_state": {1: "x"}}, "extra_state"),  # JSON would restore "1"
]


@pytest.mark.parametrize(
    ("decorator", "kwargs", "parameter"),
    [(d, k, p) for _, d, k, p in DECORATOR_CASES],
    ids=[f"{n}-{next(iter(k))}={next(iter(k.values()))!r:.20}" for n, _, k, _ in DECORATOR_CASES],
)
def test_24_bad_decorator_arguments_are_refused_at_decoration_naming_the_parameter(
    decorator: Callable[..., Any], kwargs: dict[str, Any], parameter: str
) -> None:
    refused(lambda: decorator(**kwargs)(fn), parameter)


# ---------------------------------------------------------------------------
# 24. init: refused before anything global changes


class NotAnExporter:
    pass


INIT_CASES: list[tuple[dict[str, Any], str]] = [
    ({"service_name": 5}, "service_name"),
    ({"service_name": ""}, "service_name"),
    ({"endpoint": 5}, "endpoint"),
    ({"endpoint": ""}, "endpoint"),
    ({"protocol": "http/json"}, "protocol"),
    ({"protocol": "thrift"}, "protocol"),
    ({"protocol": 5}, "protocol"),
    ({"headers": "Authorization=x"}, "headers"),
    ({"headers": {"Authorization": 5}}, "headers"),
    ({"tracer_provider": "x"}, "tracer_provider"),
    ({"span_exporter": NotAnExporter()}, "span_exporter"),
    ({"local_dir": 5}, "local_dir"),
    ({"capture_content": "yes"}, "capture_content"),
    ({"content_limit": -5}, "content_limit"),
    ({"content_limit": "100"}, "content_limit"),
    ({"content_limit": True}, "content_limit"),
    ({"checkpoint_uri": 5}, "checkpoint_uri"),
    ({"checkpoint_uri": ""}, "checkpoint_uri"),
    ({"checkpoint_uri": "ftp://host/x"}, "ftp"),
    ({"blob_exporter": "memory://x"}, "blob_exporter"),
    ({"blob_exporter": NotAnExporter()}, "blob_exporter"),
    ({"checkpoint_serializer": "yaml"}, "yaml"),
    ({"checkpoint_serializer": 5}, "serializer"),
    ({"checkpoint_serializer": "pickle"}, "MULTIRUN_CHECKPOINT_HMAC_KEY"),
    ({"checkpoint_hmac_key": 5}, "hmac"),
    ({"checkpoint_hmac_key": "short"}, "hmac"),
    ({"checkpoint_timeout": 0}, "checkpoint_timeout"),
    ({"checkpoint_timeout": "10"}, "checkpoint_timeout"),
    ({"checkpoint_timeout": True}, "checkpoint_timeout"),
    ({"prices": "gpt-4o=1"}, "prices"),
    ({"prices": {"m": 5}}, "prices"),
    ({"prices": {"m": {"input_per_mtok": -1, "output_per_mtok": 1}}}, "input_per_mtok"),
    ({"step_history": -1}, "step_history"),
    ({"step_history": "10"}, "step_history"),
    ({"record_replay": "no"}, "record_replay"),
    ({"replay_limit": -1}, "replay_limit"),
    ({"replay_limit": "5"}, "replay_limit"),
    ({"propagate_threads": "no"}, "propagate_threads"),
    ({"meter_provider": "x"}, "meter_provider"),
    ({"metrics": "yes"}, "metrics"),
    ({"ledger_uri": "http://127.0.0.1:6379/0"}, "ledger_uri"),
    ({"ledger_uri": 5}, "ledger_uri"),
    ({"ledger_uri": "redis://127.0.0.1:6379/0?timeout=soon"}, "timeout"),
    ({"unpriced": "ignore"}, "unpriced"),
]


@pytest.mark.parametrize(
    ("kwargs", "parameter"),
    INIT_CASES,
    ids=[f"{next(iter(k))}={next(iter(k.values()))!r:.24}" for k, _ in INIT_CASES],
)
def test_24_bad_init_arguments_are_refused_before_anything_global_changes(
    global_otel: None, tmp_path: Path, kwargs: dict[str, Any], parameter: str
) -> None:
    kwargs = {"local_dir": tmp_path / "mr", **kwargs}
    refused(lambda: multirun.init(**kwargs), parameter)
    assert not isinstance(trace.get_tracer_provider(), TracerProvider)
    assert client_module._owned_provider is None
    assert client_module._configured is None


@pytest.mark.parametrize("uri", ["http://127.0.0.1:6379/0", "localhost:6379"])
def test_24_a_ledger_uri_that_is_no_redis_url_says_so_without_the_redis_package(
    global_otel: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, uri: str
) -> None:
    # the redis package is an extra: a typo in the URI is no reason to install it
    monkeypatch.setitem(sys.modules, "redis", None)
    message = refused(lambda: multirun.init(local_dir=tmp_path / "mr", ledger_uri=uri), "ledger_uri")
    assert "redis://" in message and uri in message
    assert "pip install" not in message


def test_24_a_ledger_uri_of_another_scheme_is_refused_without_its_password(global_otel, tmp_path) -> None:
    uri = "http://user:s3cret@127.0.0.1:6379/0"
    message = refused(lambda: multirun.init(local_dir=tmp_path / "mr", ledger_uri=uri), "ledger_uri")
    assert "s3cret" not in message and "user:***@127.0.0.1" in message


@pytest.mark.parametrize("database", ["/abc", "/0/extra", "/1/2", "/-1", "?db=x", "/1?db=2"])
def test_24_a_ledger_uri_whose_database_is_no_number_is_refused_without_its_password(
    global_otel: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, database: str
) -> None:
    # redis-py would use database 0 for /abc (12 for /1/2): two programs meant to keep their
    # budgets apart would share one. Refused from the URL alone, before redis is even imported.
    monkeypatch.setitem(sys.modules, "redis", None)
    uri = f"redis://user:s3cret@127.0.0.1:6379{database}"
    message = refused(lambda: multirun.init(local_dir=tmp_path / "mr", ledger_uri=uri), "ledger_uri")
    assert message.startswith("ledger_uri: ledger URL ")
    assert "database" in message or "db must be" in message
    assert "s3cret" not in message and "user:***@127.0.0.1:6379" in message
    assert client_module._configured is None


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer s3cret\r\nX-Injected: 1"},  # requests refuses it at every export
        {"Authorization": " Bearer s3cret"},  # leading whitespace: refused by requests too
        {"Authorization": "Bearer s3cret\u20ac"},  # not latin-1: http.client cannot encode it
        {"Authorization": "Bearer s3cr\xe9t"},  # latin-1, but no gRPC metadata value
        {"Auth orization": "Bearer s3cret"},  # no header name has a space
        {"": "s3cret"},
        {"Authorization": "Bearer\ts3cret"},  # HTTP sends a tab, gRPC metadata refuses it
        {"X-Api-Key!": "s3cret"},  # an HTTP token, but no gRPC metadata key
    ],
    ids=[
        "line-break",
        "leading-space",
        "not-latin-1",
        "not-ascii",
        "space-in-name",
        "empty-name",
        "tab",
        "not-a-grpc-key",
    ],
)
def test_24_a_header_no_export_could_send_is_refused_by_name_without_its_value(
    global_otel: None, tmp_path: Path, headers: dict[str, str]
) -> None:
    # accepted, every export of the run's spans and metrics would fail, with a log line each
    message = refused(
        lambda: multirun.init(local_dir=tmp_path / "mr", endpoint="http://127.0.0.1:4318", headers=headers),
        "headers",
    )
    assert repr(next(iter(headers))) in message
    assert "s3cret" not in message  # a header is often a token
    assert client_module._configured is None


def test_24_a_header_of_a_bad_type_is_refused_without_the_other_values(
    global_otel: None, tmp_path: Path
) -> None:
    headers = {"Authorization": "Bearer s3cret", "X-Retries": 3}
    message = refused(lambda: multirun.init(local_dir=tmp_path / "mr", headers=headers), "headers")
    assert "'X-Retries'" in message and "int" in message
    assert "s3cret" not in message


def test_24_init_local_refuses_a_path_that_is_not_one(global_otel: None) -> None:
    refused(lambda: multirun.init_local(5), "path")  # type: ignore[arg-type]
    assert client_module._configured is None


# ---------------------------------------------------------------------------
# 24. models and runtime calls


MODEL_CASES: list[tuple[Callable[[], Any], str]] = [
    (lambda: Budget(max_tokens=-1), "max_tokens"),
    (lambda: Budget(max_tokens="many"), "max_tokens"),
    (lambda: Budget(max_cost_usd=0), "max_cost_usd"),
    (lambda: Budget(max_steps=0), "max_steps"),
    (lambda: Budget(max_duration_seconds=-1), "max_duration_seconds"),
    (lambda: Budget(max_sub_agents=-1), "max_sub_agents"),
    (lambda: Budget(max_cost_usd=float("inf")), "max_cost_usd"),
    (lambda: Budget(max_duration_seconds=float("inf")), "max_duration_seconds"),
    (lambda: BudgetRule(max_cost_usd=float("inf")), "max_cost_usd"),
    (lambda: Budget(max_tokns=5), "max_tokns"),
    (lambda: RetryRule(max_attempts=0), "max_attempts"),
    (lambda: RetryRule(backoff="fibonacci"), "backoff"),
    (lambda: RetryRule(base_delay_seconds=-1), "base_delay_seconds"),
    (lambda: RetryRule(base_delay_seconds=float("inf")), "base_delay_seconds"),
    (lambda: RetryRule(max_delay_seconds=float("inf")), "max_delay_seconds"),
    (lambda: RateLimitRule(requests_per_minute=0), "requests_per_minute"),
    (lambda: CircuitBreakerRule(failure_threshold=0), "failure_threshold"),
    (lambda: CircuitBreakerRule(recovery_time_seconds=-1), "recovery_time_seconds"),
    (lambda: CircuitBreakerRule(excluded_errors=(int,)), "excluded_errors"),
    (lambda: GracefulDegradationRule(fallback_model=""), "fallback_model"),
    (lambda: GracefulDegradationRule(fallback_model="m", trigger="sometimes"), "trigger"),
    (lambda: GracefulDegradationRule(fallback_model="m", threshold=-1), "threshold"),
    (lambda: Policy(retry="3"), "retry"),
    (lambda: multirun.Price(input_per_mtok=-1, output_per_mtok=1), "input_per_mtok"),
    (lambda: multirun.Price(input_per_mtok="1", output_per_mtok=1), "input_per_mtok"),
    (lambda: multirun.Price(input_per_mtok=float("nan"), output_per_mtok=1), "input_per_mtok"),
    (lambda: multirun.Price(input_per_mtok=1, output_per_mtok=float("inf")), "output_per_mtok"),
    (lambda: multirun.Price(1, 1, cache_read_per_mtok=float("nan")), "cache_read_per_mtok"),
    (lambda: multirun.Price(1, 1, cache_write_per_mtok=True), "cache_write_per_mtok"),
]


@pytest.mark.parametrize(("make", "parameter"), MODEL_CASES, ids=[p for _, p in MODEL_CASES])
def test_24_bad_model_fields_are_refused_naming_the_field(make: Callable[[], Any], parameter: str) -> None:
    refused(make, parameter)


REPORT_CASES: list[tuple[dict[str, Any], str]] = [
    ({"input_tokens": -3}, "input_tokens"),
    ({"input_tokens": "3"}, "input_tokens"),
    ({"output_tokens": -1}, "output_tokens"),
    ({"output_tokens": 2.5}, "output_tokens"),
    ({"cached_input_tokens": -1}, "cached_input_tokens"),
    ({"reasoning_tokens": -1}, "reasoning_tokens"),
    ({"cost_usd": -0.01}, "cost_usd"),
    ({"cost_usd": "free"}, "cost_usd"),
    ({"model": 5}, "model"),
    ({"provider": 5}, "provider"),
]


@pytest.mark.parametrize(("kwargs", "parameter"), REPORT_CASES, ids=[p for _, p in REPORT_CASES])
def test_24_bad_usage_reports_are_refused_naming_the_field(
    traced: Any, kwargs: dict[str, Any], parameter: str
) -> None:
    refused(lambda: multirun.report_usage(**{"model": "gpt-4o-mini", **kwargs}), parameter)


@pytest.mark.parametrize(
    ("kwargs", "parameter"),
    [({}, "run_id"), ({"run_id": "a", "checkpoint_id": "b"}, "run_id"), ({"run_id": 5}, "run_id")],
)
def test_24_resume_refuses_bad_arguments(traced: Any, kwargs: dict[str, Any], parameter: str) -> None:
    def enter() -> None:
        with multirun.resume(**kwargs):
            pass

    refused(enter, parameter)


@pytest.mark.parametrize("carrier", ["traceparent=00-...", 5, None])
def test_24_continue_run_refuses_a_carrier_that_is_not_a_mapping(traced: Any, carrier: Any) -> None:
    def enter() -> None:
        with multirun.continue_run(carrier):
            pass

    refused(enter, "carrier")


@pytest.mark.parametrize("carrier", ["traceparent=00-...", ("headers",), 5, [], bytearray()])
@pytest.mark.parametrize("in_run", [True, False], ids=["in-run", "outside"])
def test_24_inject_refuses_a_carrier_it_cannot_write_into(traced: Any, carrier: Any, in_run: bool) -> None:
    # in a run, OpenTelemetry's setter failed with "'str' object does not support item
    # assignment"; outside one, the string came back as if the context were in it
    @run
    def job() -> None:
        refused(lambda: multirun.inject(carrier), "carrier")

    if in_run:
        job()
    else:
        refused(lambda: multirun.inject(carrier), "carrier")


def test_24_a_state_key_that_is_no_string_is_refused_where_it_is_set(traced: Any) -> None:
    """A JSON checkpoint writes every key as a string: ``get_state(1)`` would find nothing after
    a restore. The key is refused where the program sets it, naming it."""

    @run
    def job() -> None:
        ctx = get_current_run_context()
        refused(lambda: ctx.set_state(1, "x"), "key")
        refused(lambda: get_current_agent_context().set_state(("a", 1), "x"), "key")
        refused(lambda: ctx.checkpoint(extra_state={1: "x"}), "extra_state")
        refused(lambda: ctx.checkpoint(extra_state="x"), "extra_state")  # type: ignore[arg-type]
        assert ctx.state == {}

    job()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    parameter=st.sampled_from(["retry", "retry_delay", "retry_max_delay", "checkpoint", "idempotent"]),
    value=st.one_of(
        st.text(), st.lists(st.integers()), st.dictionaries(st.text(), st.integers()), st.just(object())
    ),
)
def test_24_any_wrong_type_for_a_step_parameter_is_refused_naming_it(parameter: str, value: Any) -> None:
    refused(lambda: step(**{parameter: value})(fn), parameter)


# ---------------------------------------------------------------------------
# 25. a 10 MB prompt with content capture on


@dataclasses.dataclass
class Conversation:
    messages: list[dict[str, str]]


class Prompt(pydantic.BaseModel):
    text: str


TEN_MB = 10 * 1024 * 1024
LIMIT = 4096


def shapes() -> dict[str, Callable[[str], Any]]:
    """A 10 MB prompt in the forms an agent passes it around."""
    return {
        "str": lambda big: big,
        "messages": lambda big: [{"role": "user", "content": big}],
        "kwargs-dict": lambda big: {"prompt": big, "temperature": 0.2},
        "bytes": lambda big: big.encode(),
        "bytes-in-list": lambda big: [big.encode()],
        "pydantic": lambda big: Prompt(text=big),
        "dataclass": lambda big: Conversation([{"role": "user", "content": big}]),
        "tuple-of-str": lambda big: ("system", big),
    }


@pytest.mark.parametrize("shape", list(shapes()))
def test_25_a_ten_megabyte_prompt_is_truncated_to_the_limit_without_a_copy(traced: Any, shape: str) -> None:
    # replay recording off: its input hash reads every byte of the arguments (see tests/FAULTS.md)
    multirun.init(
        tracer_provider=traced.provider, capture_content=True, content_limit=LIMIT, record_replay=False
    )
    prompt = shapes()[shape]("x" * TEN_MB)

    @step(kind=StepKind.LLM_CALL, model="m")
    def ask(p: Any) -> Any:
        return p  # the output is as big as the input

    @run
    def main() -> None:
        ask(prompt)

    tracemalloc.start()
    try:
        main()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    attributes = traced.span("chat m").attributes or {}
    for name in ("multirun.step.input", "multirun.step.output"):
        assert len(str(attributes[name])) <= LIMIT, name
    assert peak < 2 * 1024 * 1024, f"{peak / 1e6:.1f} MB allocated to record a 10 MB prompt"
