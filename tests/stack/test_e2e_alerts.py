"""The shipped alert rules fire for the workloads made to trip them, and reach a real Alertmanager.

Prometheus loads collector-config/prometheus/alert-rules.yml with only its ``for:``
durations shortened to 1s (the shipped ones are minutes), evaluates it every
second over the metrics the workload sent through the Collector, and sends to
Alertmanager, which runs the shipped alertmanager.yml (webhook URLs pointed at
the test's own webhook server). Everything is asserted through Alertmanager's
API, ``/api/v2/alerts``, and the notifications it posts.
"""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
from stack_servers import ROOT, Stack, Workload, wait_for

pytestmark = pytest.mark.stack

RULES = ROOT / "collector-config" / "prometheus" / "alert-rules.yml"

# which run name of stack_workload.py each alert must fire for (and no other)
EXPECTED = {
    "MultiRunCostOverrun": {"runaway_crew"},
    "MultiRunBudgetExceeded": {"capped_crew"},
    "MultiRunCircuitBreakerOpen": {"flaky_crew"},
    "MultiRunStepFailureRatio": {"flaky_crew"},
}
# alerts the main workload must not trip: the lossy workload's service trips them
ELSEWHERE = {"MultiRunSpansDropped"}


def alerts(stack: Stack) -> list[dict[str, Any]]:
    response = httpx.get(f"{stack.alertmanager.url('web')}/api/v2/alerts", timeout=5)
    response.raise_for_status()
    found: list[dict[str, Any]] = response.json()
    return found


def fired(stack: Stack, service: str) -> dict[str, set[str]]:
    """Alert name -> the run names it fired for, in Alertmanager, for ``service``."""
    by_name: dict[str, set[str]] = {}
    for alert in alerts(stack):
        labels = alert["labels"]
        if labels.get("job") == service:
            by_name.setdefault(labels["alertname"], set()).add(labels.get("gen_ai_workflow_name", ""))
    return by_name


def firing(stack: Stack) -> dict[str, list[tuple[str, str]]]:
    """Alert name -> (run name, state) of Prometheus' own alerts: where an alert got stuck."""
    return {
        rule["name"]: [
            (a["labels"].get("gen_ai_workflow_name", ""), a["state"]) for a in rule.get("alerts", [])
        ]
        for rule in stack.prom.rules()
        if rule["type"] == "alerting"
    }


def alert_in_alertmanager(stack: Stack, name: str, service: str) -> dict[str, Any]:
    """The alert ``name`` of ``service`` once it is in Alertmanager (60 s at most)."""

    def found() -> dict[str, Any] | None:
        for alert in alerts(stack):
            labels = alert["labels"]
            if labels["alertname"] == name and labels.get("job") == service:
                return alert
        return None

    alert: dict[str, Any] = wait_for(
        f"{name} in Alertmanager", found, timeout=60, found=lambda: firing(stack)
    )
    return alert


def test_cost_overrun_fires_and_reaches_alertmanager(stack: Stack, workload: Workload) -> None:
    """runaway_crew spends dollars a second: MultiRunCostOverrun (``for:`` shortened to 1s) reaches
    Alertmanager with its labels and annotations, and the on-call webhook of the shipped route gets it."""

    alert = alert_in_alertmanager(stack, "MultiRunCostOverrun", workload.service)
    assert alert["labels"]["gen_ai_workflow_name"] == "runaway_crew"
    assert alert["labels"]["severity"] == "critical"
    assert "runaway_crew" in alert["annotations"]["summary"]
    assert alert["status"]["state"] == "active"
    assert [receiver["name"] for receiver in alert["receivers"]] == ["oncall-webhook"]

    def notified() -> list[dict[str, Any]] | None:
        posts = [
            body
            for path, body in stack.webhook.posts
            if body.get("receiver") == "oncall-webhook"
            and any(a["labels"]["alertname"] == "MultiRunCostOverrun" for a in body.get("alerts", []))
        ]
        return posts or None

    (body, *_) = wait_for("the on-call webhook notification", notified, timeout=60)
    assert body["status"] == "firing"
    assert body["commonLabels"]["gen_ai_workflow_name"] == "runaway_crew"


def test_every_alert_fires_for_its_workload_and_no_other(stack: Stack, workload: Workload) -> None:
    """Each shipped alert fires for the run name made to trip it and for no other; the healthy
    demo (research_crew) and the frugal crew trip none (``for:`` shortened to 1s)."""
    shipped = set(re.findall(r"(?m)^\s*-\s*alert:\s*(\S+)", RULES.read_text()))
    untested = shipped - set(EXPECTED) - ELSEWHERE
    assert not untested, f"alerts without a workload that trips them in stack_workload.py: {sorted(untested)}"
    expected = shipped - ELSEWHERE

    def all_fired() -> dict[str, set[str]] | None:
        found = fired(stack, workload.service)
        return found if all(EXPECTED[name] <= found.get(name, set()) for name in expected) else None

    found = wait_for(
        f"every alert to reach Alertmanager ({sorted(expected)})",
        all_fired,
        timeout=60,
        found=lambda: {"Alertmanager": fired(stack, workload.service), "Prometheus": firing(stack)},
    )
    assert {name: found.get(name) for name in shipped} == {name: EXPECTED.get(name) for name in shipped}


def test_spans_dropped_fires_for_the_service_that_lost_them(stack: Stack, lossy_workload: str) -> None:
    """Spans sent where nothing listens are counted dropped: MultiRunSpansDropped reaches
    Alertmanager for that service, with the reason, and goes to the team's webhook."""

    alert = alert_in_alertmanager(stack, "MultiRunSpansDropped", lossy_workload)
    assert alert["labels"]["error_type"] == "export_failed"
    assert alert["labels"]["category"] == "telemetry"
    assert lossy_workload in alert["annotations"]["summary"]
    assert [receiver["name"] for receiver in alert["receivers"]] == ["team-webhook"]


def test_circuit_breaker_alert_inhibits_the_failure_ratio_alert(stack: Stack, workload: Workload) -> None:
    """The shipped inhibit rule: while the circuit of flaky_crew is open, its failure-ratio alert waits."""

    def ratio_alert() -> dict[str, Any] | None:
        for alert in alerts(stack):
            labels = alert["labels"]
            if (
                labels["alertname"] == "MultiRunStepFailureRatio"
                and labels.get("job") == workload.service
                and alert["status"]["state"] == "suppressed"
            ):
                return alert
        return None

    alert = wait_for(
        "MultiRunStepFailureRatio, suppressed by the circuit breaker alert",
        ratio_alert,
        timeout=60,
        found=lambda: [(a["labels"]["alertname"], a["status"]) for a in alerts(stack)],
    )
    assert alert["status"]["inhibitedBy"], alert["status"]
