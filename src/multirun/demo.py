"""The bundled demo: a small research crew, run offline against a fake model.

``multirun demo`` runs it. It is also the quickest tour of the API::

    @run(budget=Budget(...))        one run: one trace, one budget
    @agent(name="researcher")       the agents inside it
    @step(kind=StepKind.LLM_CALL)   steps: model calls, tool calls, with retries
    multirun.report_usage(...)      the tokens a model call used (priced by model name)
    @checkpoint                     save the run's state once a stage is done

The crew: a planner splits a topic into questions; a researcher answers them
in parallel (search, fetch a page, summarize it); a writer streams the report.
The model is a fake with deterministic answers and token counts, so the demo
needs no network and no API key, but the model names are real ones and so are
their prices.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

from opentelemetry import trace

import multirun
from multirun import agent, checkpoint, run, step
from multirun.context import get_current_run_context, get_current_step_context
from multirun.models import Budget, StepKind

PLANNER_MODEL = "gpt-4o-mini"
RESEARCH_MODEL = "claude-3-5-haiku"
WRITER_MODEL = "gpt-4o-mini"
DEFAULT_TOPIC = "OpenTelemetry for AI agents"


# ---------------------------------------------------------------------------
# configuration: files by default, a collector when asked


def configure(directory: str | os.PathLike[str], endpoint: str | None = None) -> multirun.MultiRunClient:
    """Send traces to ``directory/traces`` (or to the OTLP collector at ``endpoint``).

    Checkpoints go to ``directory/blobs`` either way.
    """
    if endpoint is not None or endpoint_from_environment():
        return multirun.init(endpoint=endpoint, local_dir=directory, service_name="multirun-demo")
    return multirun.init_local(directory, service_name="multirun-demo")


def endpoint_from_environment() -> str | None:
    """The OTLP endpoint the standard variables name, if any."""
    return (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or None
    )


# ---------------------------------------------------------------------------
# a fake model: same prompt, same answer, same token counts


@dataclass(frozen=True)
class Reply:
    """What the fake model answers, with the usage a real API would return."""

    text: str
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int = 0


SYSTEM_PROMPT_TOKENS = 64  # a shared system prompt, cached by the provider after first use


class FakeModel:
    """Answers prompts ``"<task>: <subject>\n<context>"`` offline, deterministically."""

    def __init__(self, latency: float = 0.02) -> None:
        self.latency = latency

    async def complete(self, model: str, prompt: str, *, cached: bool = False) -> Reply:
        """One answer; ``cached`` says the system prompt is already in the provider's cache."""
        await asyncio.sleep(self.latency)
        return self.answer(model, prompt, cached=cached)

    async def stream(self, model: str, prompt: str) -> AsyncIterator[str]:
        """The answer word by word, as a streaming API sends it."""
        reply = self.answer(model, prompt)
        for word in reply.text.split(" "):
            await asyncio.sleep(self.latency / 4)
            yield word + " "

    def answer(self, model: str, prompt: str, *, cached: bool = False) -> Reply:
        task, _, rest = prompt.partition(": ")
        subject = rest.splitlines()[0] if rest else ""
        text = _ANSWERS.get(task, "I have nothing to add about {subject}.").format(subject=subject)
        input_tokens = SYSTEM_PROMPT_TOKENS + 2 * len(prompt.split()) + _jitter(model, prompt)
        output_tokens = 2 * len(text.split())
        cached_tokens = SYSTEM_PROMPT_TOKENS if cached else 0
        return Reply(text, input_tokens, output_tokens, cached_tokens)


_ANSWERS = {
    "plan": "What is {subject}?\nWho uses {subject} today?\nWhat can go wrong with {subject}?",
    "summarize": "{subject} The sources agree on a short answer.",
    "write": "A short report on {subject}: each question was researched, "
    "a source was read, and the findings are in the notes below.",
}


def _jitter(model: str, prompt: str) -> int:
    """A few tokens more or less, the same for the same prompt."""
    return hashlib.sha256(f"{model}|{prompt}".encode()).digest()[0] % 16


MODEL = FakeModel()


# ---------------------------------------------------------------------------
# steps: the units of work that become spans


@step(kind=StepKind.LLM_CALL, model=PLANNER_MODEL)
async def plan_questions(topic: str) -> list[str]:
    """Ask the model to split a topic into research questions."""
    reply = await MODEL.complete(PLANNER_MODEL, f"plan: {topic}")
    multirun.report_usage(PLANNER_MODEL, input_tokens=reply.input_tokens, output_tokens=reply.output_tokens)
    return reply.text.splitlines()


@step(kind=StepKind.TOOL_CALL)
async def web_search(question: str) -> list[str]:
    """A search tool: the URLs of pages that answer ``question``."""
    await asyncio.sleep(0.01)
    slug = hashlib.sha256(question.encode()).hexdigest()[:8]
    host = "slow.example.org" if "wrong" in question else "docs.example.com"
    return [f"https://{host}/{slug}", f"https://mirror.example.net/{slug}"]


@step(kind=StepKind.TOOL_CALL, retry=2, retry_delay=0.05)
async def fetch_page(url: str) -> str:
    """Download a page. The fake network drops the first connection to a slow host."""
    await asyncio.sleep(0.01)
    if "slow." in url and get_current_step_context().attempt == 1:
        raise ConnectionError(f"connection to {url} reset by peer")
    return f"The page at {url} explains the question in detail."


@step(kind=StepKind.LLM_CALL, model=RESEARCH_MODEL)
async def summarize(question: str, page: str) -> str:
    """Summarize a page as an answer to one question."""
    reply = await MODEL.complete(RESEARCH_MODEL, f"summarize: {question}\n{page}", cached=True)
    multirun.report_usage(
        RESEARCH_MODEL,
        input_tokens=reply.input_tokens,
        output_tokens=reply.output_tokens,
        cached_input_tokens=reply.cached_input_tokens,
    )
    return reply.text


@step(kind=StepKind.LLM_CALL, model=WRITER_MODEL)
async def stream_report(topic: str, notes: list[str]) -> AsyncIterator[str]:
    """Stream the report; usage is known, and reported, once the stream ends."""
    prompt = f"write: {topic}\n" + "\n".join(notes)
    async for chunk in MODEL.stream(WRITER_MODEL, prompt):
        yield chunk
    reply = MODEL.answer(WRITER_MODEL, prompt)
    multirun.report_usage(WRITER_MODEL, input_tokens=reply.input_tokens, output_tokens=reply.output_tokens)


@step
def add_sources(report: str, notes: list[str]) -> str:
    """A plain function step: append the numbered notes to the report."""
    lines = [report.strip(), "", "Notes:"]
    lines += [f"  [{number}] {note}" for number, note in enumerate(notes, 1)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# agents: each one groups its steps under one span


@agent(name="planner")
async def planner(topic: str) -> list[str]:
    """Split the topic into questions."""
    return await plan_questions(topic)


@checkpoint(name="research_done")
@agent(name="researcher")
async def researcher(questions: list[str]) -> list[str]:
    """Answer every question in parallel; a checkpoint is saved when all are answered."""
    return list(await asyncio.gather(*(answer_question(q) for q in questions)))


async def answer_question(question: str) -> str:
    """Not a step itself: its three steps land under the researcher, side by side."""
    urls = await web_search(question)
    page = await fetch_page(urls[0])
    return await summarize(question, page)


@agent(name="writer")
async def writer(topic: str, notes: list[str]) -> str:
    """Stream the report, then add the notes it is based on."""
    chunks = [chunk async for chunk in stream_report(topic, notes)]
    return add_sources("".join(chunks), notes)


# ---------------------------------------------------------------------------
# the run: one trace, one budget


@dataclass
class DemoResult:
    run_id: str
    report: str
    recorded: bool = True  # whether the run's span was recorded (the sampler's call)


@run(name="research_crew", budget=Budget(max_cost_usd=0.50, max_steps=100))
async def research_crew(topic: str) -> DemoResult:
    """Plan, research in parallel, write. The budget is checked before every step."""
    run_ctx = get_current_run_context()
    questions = await planner(topic)
    run_ctx.set_state("questions", questions)  # state goes into every checkpoint
    notes = await researcher(questions)
    report = await writer(topic, notes)
    recorded = trace.get_current_span().is_recording()
    return DemoResult(run_id=run_ctx.run.id, report=report, recorded=recorded)


def run_demo(topic: str = DEFAULT_TOPIC) -> DemoResult:
    """Run the crew once (configure multirun first, see ``configure``)."""
    return asyncio.run(research_crew(topic))


if __name__ == "__main__":  # pragma: no cover - ``multirun demo`` is the usual way
    configure(".multirun")
    print(run_demo().report)
