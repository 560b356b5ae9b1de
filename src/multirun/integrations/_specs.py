"""The StepSpec of a framework's step, cached: what the instrumentations open their steps with.

A framework's task or step is not a function decorated with ``@step``, so the
instrumentations describe it with a StepSpec of their own and open it with the
package's step machinery (policy, budget, spans, metrics). The framework does
its own retrying, and its steps carry state of the framework's (clients,
agents, futures) that a replay would skip, so these steps neither retry nor
replay.
"""

from __future__ import annotations

from multirun.decorators import StepSpec
from multirun.models.policy import BackoffStrategy
from multirun.models.step import StepKind

_MAX_CACHED = 4096  # step names and models are few; the cache never grows without bound


def _body() -> None:
    """Stands for the framework's callable a StepSpec describes (only its name is read)."""


_specs: dict[tuple[str, StepKind, str | None, StepKind | None], StepSpec] = {}


def framework_step_spec(
    name: str, kind: StepKind, model: str | None, policy_kind: StepKind | None = None
) -> StepSpec:
    """The spec of a framework step ``name`` of ``kind`` asking for ``model``.

    ``policy_kind``: the kind the policy governs it as, when not its own: a step whose model
    requests are steps of their own (ClientAI's think around ``generate_text``) is governed as a
    function, so that one request takes one rate-limit slot and counts as one failure.
    """
    key = (name, kind, model, policy_kind)
    spec = _specs.get(key)
    if spec is None:
        if len(_specs) >= _MAX_CACHED:
            _specs.clear()
        spec = _specs[key] = StepSpec(
            _body,
            name=name,
            kind=kind,
            retry=0,  # the framework retries; its attempts are reported to the step
            retry_delay=0.0,
            retry_max_delay=0.0,
            retry_strategy=BackoffStrategy.CONSTANT,
            retry_on=None,
            checkpoint=False,
            idempotent=False,
            check_budget=True,
            model=model,
        )
        spec.follows_stream = False  # what it returns goes to the framework
        if policy_kind is not None:
            spec.policy_kind = policy_kind
    return spec
