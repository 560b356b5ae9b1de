"""The pydantic models of reference 001: fields, defaults, enums and Budget checks."""

from __future__ import annotations

import base64
import json
import pickle
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import pydantic
import pytest

from multirun.enforcement.ledger import RunLedger
from multirun.models import Agent, AgentConfig, Budget, Checkpoint, Policy, Run, Step
from multirun.models.policy import (
    BudgetRule,
    CircuitBreakerRule,
    GracefulDegradationRule,
    RateLimitRule,
    RetryRule,
)


def test_models_import_as_reference_writes_them() -> None:
    for cls in (Run, Step, Budget, Checkpoint, Policy, Agent, AgentConfig):
        assert issubclass(cls, pydantic.BaseModel), cls


def test_policy_rules_import_as_reference_writes_them() -> None:
    for cls in (RetryRule, RateLimitRule, CircuitBreakerRule):
        assert issubclass(cls, pydantic.BaseModel), cls


# ---------------------------------------------------------------------------
# enums


def test_run_status_values() -> None:
    from multirun.models import RunStatus

    assert {s.name: s.value for s in RunStatus} == {
        "PENDING": "pending",
        "RUNNING": "running",
        "COMPLETED": "completed",
        "FAILED": "failed",
        "CANCELLED": "cancelled",
        "PAUSED": "paused",
    }
    assert isinstance(RunStatus.PENDING, str)


def test_step_kind_values() -> None:
    from multirun.models import StepKind

    assert {s.name: s.value for s in StepKind} == {
        "FUNCTION": "function",
        "LLM_CALL": "llm_call",
        "TOOL_CALL": "tool_call",
        "SUB_AGENT": "sub_agent",
        "DECISION": "decision",
        "CHECKPOINT": "checkpoint",
    }


def test_step_status_values() -> None:
    from multirun.models import StepStatus

    assert {s.name: s.value for s in StepStatus} == {
        "PENDING": "pending",
        "RUNNING": "running",
        "COMPLETED": "completed",
        "FAILED": "failed",
        "SKIPPED": "skipped",
    }


def test_policy_decision_values() -> None:
    from multirun.models import PolicyDecision

    assert [d.value for d in PolicyDecision] == ["proceed", "wait", "fallback", "abort"]


def test_backoff_strategy_values() -> None:
    from multirun.models import BackoffStrategy

    assert [b.value for b in BackoffStrategy] == ["constant", "linear", "exponential"]


def test_agent_status_values() -> None:
    from multirun.models import AgentStatus

    assert [s.value for s in AgentStatus] == [
        "pending",
        "running",
        "completed",
        "failed",
        "cancelled",
    ]


# ---------------------------------------------------------------------------
# Run, Step


def test_run_defaults_match_reference() -> None:
    from multirun.models import RunStatus

    run = Run()
    assert run.name == ""
    assert run.status is RunStatus.PENDING
    assert run.parent_id is None
    assert run.steps == []
    assert run.current_step_id is None
    assert run.checkpoints == []
    assert run.latest_checkpoint_id is None
    assert run.budget is None
    assert run.tokens_used == 0
    assert run.cost_usd == 0.0
    assert run.policy is None
    assert run.metadata == {}
    assert run.started_at is None
    assert run.completed_at is None
    assert run.result is None
    assert run.error is None


def test_run_id_is_a_fresh_uuid() -> None:
    first, second = Run(), Run()
    parsed = uuid.UUID(first.id)
    assert (parsed.version, parsed.variant, parsed.hex) == (4, uuid.RFC_4122, first.id)
    assert first.id != second.id


def test_run_created_at_is_now_in_utc() -> None:
    before = datetime.now(timezone.utc)
    run = Run()
    after = datetime.now(timezone.utc)
    assert run.created_at.utcoffset() == timedelta(0)
    assert before <= run.created_at <= after


def test_run_patch_applies_only_fields_that_are_set() -> None:
    from multirun.models import RunPatch, RunStatus

    run = Run(name="r", tokens_used=10, error=None)
    patched = RunPatch(status=RunStatus.COMPLETED, tokens_used=5000).apply(run)
    assert patched.status is RunStatus.COMPLETED
    assert patched.tokens_used == 5000
    assert patched.name == "r"
    assert patched.id == run.id


def test_step_defaults_match_reference() -> None:
    from multirun.models import StepKind, StepStatus

    step = Step()
    uuid.UUID(step.id)
    assert step.run_id == ""
    assert step.agent_id == ""
    assert step.name == ""
    assert step.kind is StepKind.FUNCTION
    assert step.status is StepStatus.PENDING
    assert step.parent_step_id is None
    assert step.input_hash == ""
    assert step.input_data is None
    assert step.output_data is None
    assert step.policy_decision is None
    assert step.tokens_used == 0
    assert step.cost_usd == 0.0
    assert step.latency_ms == 0
    assert step.started_at is None
    assert step.completed_at is None
    assert step.error is None
    assert step.attempt == 1


def test_step_kind_accepts_enum_value_string() -> None:
    from multirun.models import StepKind

    assert Step(kind="llm_call").kind is StepKind.LLM_CALL


# ---------------------------------------------------------------------------
# Budget


def test_budget_fields_are_all_optional() -> None:
    budget = Budget()
    assert (
        budget.max_tokens,
        budget.max_cost_usd,
        budget.max_steps,
        budget.max_duration_seconds,
        budget.max_sub_agents,
    ) == (None, None, None, None, None)


def test_budget_accepts_reference_example() -> None:
    budget = Budget(
        max_tokens=100_000,
        max_cost_usd=1.0,
        max_steps=50,
        max_duration_seconds=300,
        max_sub_agents=5,
    )
    assert budget.max_tokens == 100_000
    assert budget.max_cost_usd == 1.0
    assert budget.max_steps == 50
    assert budget.max_duration_seconds == 300
    assert budget.max_sub_agents == 5


def test_budget_without_limits_is_never_exceeded() -> None:
    run = Run(tokens_used=10**9, cost_usd=10**6)
    assert Budget().is_exceeded(run) is False
    assert Budget().get_exceeded_reason(run) is None


def test_budget_is_exceeded_by_tokens_used_on_run() -> None:
    run = Run(tokens_used=150)
    assert Budget(max_tokens=100).is_exceeded(run) is True
    assert Budget(max_tokens=200).is_exceeded(run) is False


def test_budget_exceeded_reason_names_limit_used_and_maximum() -> None:
    reason = Budget(max_tokens=100).get_exceeded_reason(Run(tokens_used=150))
    assert reason is not None
    assert "max_tokens" in reason
    assert "150" in reason
    assert "100" in reason


def test_budget_is_exceeded_by_cost_on_run() -> None:
    run = Run(cost_usd=2.5)
    budget = Budget(max_cost_usd=1.0)
    assert budget.is_exceeded(run) is True
    reason = budget.get_exceeded_reason(run)
    assert reason is not None
    assert "max_cost_usd" in reason
    assert "2.5" in reason


def test_budget_is_exceeded_by_cost_as_the_run_ledger_compares_it() -> None:
    # a limit with float noise; the run spent the whole of it, to the nano-dollar the ledger counts
    budget = Budget(max_cost_usd=3.4575920550000916)
    ledger = RunLedger(budget=budget)
    ledger.charge(1, 3_457_592_055)
    run = Run(cost_usd=ledger.cost_usd)
    assert budget.is_exceeded(run) is ledger.status(budget).is_exceeded is True


def test_budget_is_exceeded_by_steps_over_the_limit() -> None:
    three = Run(steps=[Step(name=str(i)) for i in range(3)])
    assert Budget(max_steps=2).is_exceeded(three) is True
    assert Budget(max_steps=3).is_exceeded(three) is False
    reason = Budget(max_steps=2).get_exceeded_reason(three)
    assert reason == "max_steps (3 of 2 steps used)"  # the same words as BudgetExceededError


def test_budget_is_exceeded_by_duration_of_finished_run() -> None:
    start = datetime(2024, 1, 1, tzinfo=timezone.utc)
    run = Run(started_at=start, completed_at=start + timedelta(seconds=400))
    assert Budget(max_duration_seconds=300).is_exceeded(run) is True
    assert Budget(max_duration_seconds=500).is_exceeded(run) is False


def test_budget_status_fields_match_reference() -> None:
    from multirun.models import BudgetStatus

    status = BudgetStatus(
        tokens_used=10,
        tokens_remaining=90,
        cost_used_usd=0.5,
        cost_remaining_usd=0.5,
        steps_used=1,
        steps_remaining=None,
        percentage_used=50.0,
        is_exceeded=False,
    )
    assert status.tokens_remaining == 90
    assert status.cost_remaining_usd == 0.5
    assert status.steps_remaining is None
    assert status.percentage_used == 50.0
    assert status.is_exceeded is False


# ---------------------------------------------------------------------------
# Checkpoint, Policy, Agent


def test_checkpoint_fields_match_reference() -> None:
    ckpt = Checkpoint(
        run_id="r1",
        agent_id="a1",
        step_id="s1",
        name="after_search",
        state_data=b"{}",
        state_format="json",
        context={"k": 1},
        environment={"python": "3"},
        size_bytes=2,
    )
    assert ckpt.id
    assert (ckpt.run_id, ckpt.agent_id, ckpt.step_id, ckpt.name) == ("r1", "a1", "s1", "after_search")
    assert ckpt.state_data == b"{}"
    assert ckpt.state_format == "json"
    assert ckpt.context == {"k": 1}
    assert ckpt.environment == {"python": "3"}
    assert ckpt.size_bytes == 2
    assert ckpt.created_at.utcoffset() == timedelta(0)


def test_checkpoint_meta_is_listed_on_run() -> None:
    from multirun.models import CheckpointMeta

    meta = CheckpointMeta(id="c1", run_id="r1", name="n", size_bytes=3)
    run = Run(checkpoints=[meta], latest_checkpoint_id="c1")
    assert run.checkpoints[0].size_bytes == 3
    assert run.checkpoints[0].created_at is None


def test_policy_accepts_reference_example() -> None:
    from multirun.models import BackoffStrategy

    policy = Policy(
        retry=RetryRule(max_attempts=3, backoff=BackoffStrategy.EXPONENTIAL),
        rate_limit=RateLimitRule(requests_per_minute=60),
        circuit_breaker=CircuitBreakerRule(failure_threshold=5, recovery_time_seconds=60),
    )
    assert policy.retry is not None
    assert policy.retry.max_attempts == 3
    assert policy.retry.backoff is BackoffStrategy.EXPONENTIAL
    assert policy.rate_limit is not None
    assert policy.rate_limit.requests_per_minute == 60
    assert policy.circuit_breaker is not None
    assert policy.circuit_breaker.failure_threshold == 5
    assert policy.budget is None
    assert policy.graceful_degradation is None


class _QuotaError(Exception):
    """An exception class of the program's own, for a circuit breaker to leave out."""


def test_a_policy_with_excluded_errors_round_trips_through_json() -> None:
    """``CircuitBreakerRule.excluded_errors`` holds classes: in JSON (a policy's, or a run's that
    has it) they are written by their import path, and read back as the same classes."""
    policy = Policy(circuit_breaker=CircuitBreakerRule(excluded_errors=(ValueError, _QuotaError)))
    run = Run(name="r", policy=policy)
    dumped = json.loads(run.model_dump_json())
    assert dumped["policy"]["circuit_breaker"]["excluded_errors"] == [
        "builtins.ValueError",
        f"{__name__}._QuotaError",
    ]
    assert Run.model_validate_json(run.model_dump_json()) == run
    assert Policy.model_validate(policy.model_dump(mode="json")) == policy
    assert policy.model_dump()["circuit_breaker"]["excluded_errors"] == (ValueError, _QuotaError)


def test_an_excluded_error_named_by_a_path_that_is_no_exception_class_is_refused_naming_it() -> None:
    assert CircuitBreakerRule.model_validate({"excluded_errors": ["TimeoutError"]}).excluded_errors == (
        TimeoutError,
    )  # a builtin by its bare name, as a config written by hand may give it
    for path in ("builtins.len", "no_such_module_x.Error", "NoSuchError"):
        with pytest.raises(pydantic.ValidationError, match=rf"(?s)excluded_errors.*{path}"):
            CircuitBreakerRule.model_validate_json(json.dumps({"excluded_errors": [path]}))


def test_policy_fields_are_all_optional() -> None:
    policy = Policy()
    assert (
        policy.budget,
        policy.rate_limit,
        policy.retry,
        policy.circuit_breaker,
        policy.graceful_degradation,
    ) == (None, None, None, None, None)


def test_retry_rule_has_reference_fields() -> None:
    from multirun.models import BackoffStrategy

    rule = RetryRule(
        max_attempts=4,
        backoff=BackoffStrategy.LINEAR,
        base_delay_seconds=0.5,
        max_delay_seconds=10,
    )
    assert (rule.max_attempts, rule.backoff, rule.base_delay_seconds, rule.max_delay_seconds) == (
        4,
        BackoffStrategy.LINEAR,
        0.5,
        10,
    )


def test_graceful_degradation_rule_has_reference_fields() -> None:
    from multirun.models import DegradationTrigger, GracefulDegradationRule

    rule = GracefulDegradationRule(
        fallback_model="gpt-4o-mini", trigger=DegradationTrigger.COST_PERCENTAGE, threshold=75
    )
    assert rule.fallback_model == "gpt-4o-mini"
    assert rule.trigger is DegradationTrigger.COST_PERCENTAGE
    assert rule.threshold == 75


def test_graceful_degradation_percentage_over_100_is_refused() -> None:
    from pydantic import ValidationError

    from multirun.models import DegradationTrigger, GracefulDegradationRule

    with pytest.raises(ValidationError, match="0 to 100, got 150"):
        GracefulDegradationRule(fallback_model="gpt-4o-mini", threshold=150)
    # a count of failures is not a percentage
    rule = GracefulDegradationRule(
        fallback_model="gpt-4o-mini", trigger=DegradationTrigger.CONSECUTIVE_FAILURES, threshold=150
    )
    assert rule.threshold == 150


def test_agent_fields_match_reference() -> None:
    from multirun.models import AgentStatus

    agent = Agent(run_id="r1", name="researcher", agent_config_id="ac_123")
    assert agent.id
    assert agent.run_id == "r1"
    assert agent.name == "researcher"
    assert agent.agent_config_id == "ac_123"
    assert agent.status is AgentStatus.PENDING
    assert agent.tokens_used == 0
    assert agent.cost_usd == 0.0
    assert agent.started_at is None
    assert agent.completed_at is None
    assert agent.error is None
    assert agent.metadata is None


def test_agent_config_fields_match_reference() -> None:
    config = AgentConfig(
        workspace_id="ws",
        name="planner",
        description="plans",
        config={"model": "gpt-4o"},
        default_budget=Budget(max_tokens=10),
    )
    assert config.id
    assert config.workspace_id == "ws"
    assert config.name == "planner"
    assert config.description == "plans"
    assert config.config == {"model": "gpt-4o"}
    assert config.default_budget == Budget(max_tokens=10)
    assert config.created_at.utcoffset() == timedelta(0)
    assert config.updated_at.utcoffset() == timedelta(0)


def test_run_round_trips_through_json() -> None:
    run = Run(name="r", budget=Budget(max_tokens=5), metadata={"k": "v"}, tokens_used=3)
    again = Run.model_validate_json(run.model_dump_json())
    assert again == run


def test_a_checkpoint_with_a_binary_state_round_trips_through_json() -> None:
    """A pickle checkpoint's state_data (what ``client.checkpoints.load(id).checkpoint`` holds)
    is not UTF-8: its JSON carries it as base64, and reads back to the same bytes."""
    blob = pickle.dumps({"state": object.__name__}) + bytes(range(256))
    ckpt = Checkpoint(run_id="r1", name="n", state_data=blob, state_format="pickle", size_bytes=len(blob))
    text = ckpt.model_dump_json()
    assert base64.urlsafe_b64decode(json.loads(text)["state_data"]) == blob  # pydantic's alphabet
    assert Checkpoint.model_validate_json(text) == ckpt


def test_ids_are_drawn_without_os_urandom(monkeypatch) -> None:
    """os.urandom drops and retakes the GIL so quickly that the span export thread starves
    and drops spans when many runs start (benchmarks/results/export_starvation.md)."""
    import os

    from multirun.models import Agent, Run

    def no_urandom(n: int) -> bytes:
        raise AssertionError("os.urandom called")

    monkeypatch.setattr(os, "urandom", no_urandom)
    ids = {Run().id for _ in range(100)} | {Agent().id for _ in range(100)}
    assert len(ids) == 200
    assert all(len(i) == 32 and i[12] == "4" for i in ids)  # UUID4 layout, hex


def test_a_step_model_built_without_validation_is_the_validated_one() -> None:
    from multirun.models import StepKind, StepStatus
    from multirun.models._base import construct_trusted

    now = datetime.now(timezone.utc)
    fields = {
        "id": "a" * 32,
        "run_id": "b" * 32,
        "name": "search",
        "kind": StepKind.TOOL_CALL,
        "status": StepStatus.COMPLETED,
        "started_at": now,
        "tokens_used": 12,
    }
    built, validated = construct_trusted(Step, fields), Step(**fields)
    assert built == validated
    assert built.model_dump_json() == validated.model_dump_json()  # same fields, same order
    assert built.model_fields_set == validated.model_fields_set
    assert Step.model_validate(built.model_dump()) == validated


@pytest.mark.parametrize(
    ("model", "field"),
    [
        (Budget, "max_tokens"),
        (Budget, "max_cost_usd"),
        (Budget, "max_steps"),
        (Budget, "max_duration_seconds"),
        (Budget, "max_sub_agents"),
        (BudgetRule, "max_tokens"),
        (BudgetRule, "max_cost_usd"),
        (RateLimitRule, "requests_per_minute"),
        (RetryRule, "max_attempts"),
        (RetryRule, "base_delay_seconds"),
        (RetryRule, "max_delay_seconds"),
        (CircuitBreakerRule, "failure_threshold"),
        (CircuitBreakerRule, "recovery_time_seconds"),
    ],
)
def test_a_limit_given_as_a_bool_is_refused_naming_the_field(
    model: type[pydantic.BaseModel], field: str
) -> None:
    # pydantic takes True for 1: Budget(max_steps=True) was a limit of one step, as the
    # decorators' own limits (retry=True) are refused
    with pytest.raises(pydantic.ValidationError, match=rf"{field}\n.*a number, not a bool"):
        model(**{field: True})


@pytest.mark.parametrize(
    ("model", "field"),
    [
        (Budget, "max_tokens"),
        (Budget, "max_steps"),
        (Budget, "max_sub_agents"),
        (BudgetRule, "max_tokens"),
    ],
)
def test_a_count_limit_beyond_64_bits_is_refused_naming_the_field(
    model: type[pydantic.BaseModel], field: str
) -> None:
    # the run span carries the limits as OTLP 64-bit integers (an exporter drops a larger one and
    # logs an error at every export) and the shared ledger counts in them: "no limit" is None
    refused = rf"{field}\n.*less than or equal to 9223372036854775807"
    with pytest.raises(pydantic.ValidationError, match=refused):
        model(**{field: 10**30})
    assert getattr(model(**{field: 2**63 - 1}), field) == 2**63 - 1


def test_a_rule_threshold_given_as_a_bool_is_refused() -> None:
    with pytest.raises(pydantic.ValidationError, match=r"threshold\n.*a number, not a bool"):
        GracefulDegradationRule(fallback_model="gpt-4o-mini", threshold=False)


def test_a_budget_changed_after_it_is_given_to_a_run_is_checked_like_a_new_one() -> None:
    # @run reads its budget at each run: a nonsense value set later failed deep in the ledger
    budget = Budget(max_steps=2)
    for bad in (-1, "abc", True):
        with pytest.raises(pydantic.ValidationError, match="max_steps"):
            budget.max_steps = bad  # type: ignore[assignment]
    assert budget.max_steps == 2
    budget.max_steps = 10
    assert budget.max_steps == 10


def test_policy_rules_changed_after_construction_are_checked_like_new_ones() -> None:
    policy = Policy(retry=RetryRule(), circuit_breaker=CircuitBreakerRule())
    with pytest.raises(pydantic.ValidationError, match="max_attempts"):
        policy.retry.max_attempts = 0  # type: ignore[union-attr]
    with pytest.raises(pydantic.ValidationError, match="failure_threshold"):
        policy.circuit_breaker.failure_threshold = -1  # type: ignore[union-attr]
    with pytest.raises(pydantic.ValidationError, match="max_attempts"):
        policy.retry = {"max_attempts": -3}  # type: ignore[assignment]
    policy.rate_limit = {"requests_per_minute": 30}  # type: ignore[assignment]
    assert policy.rate_limit == RateLimitRule(requests_per_minute=30)


@pytest.mark.parametrize(
    ("rule", "field", "bad"),
    [
        (RetryRule(), "base_delay_seconds", 120),  # above its cap
        (GracefulDegradationRule(fallback_model="gpt-4o-mini"), "threshold", 150),  # a percentage
    ],
    ids=["retry-base-delay", "degradation-threshold"],
)
def test_a_rule_whose_refused_assignment_was_caught_is_still_the_valid_rule_it_was(
    rule: Any, field: str, bad: float
) -> None:
    # pydantic (#7105) sets the field before a rule's own check refuses it: a program that caught
    # the error ran with the refused value, which no constructor accepts
    before = rule.model_dump()
    with pytest.raises(pydantic.ValidationError, match=field):
        setattr(rule, field, bad)
    assert rule.model_dump() == before
    assert type(rule).model_validate(rule.model_dump()) == rule
