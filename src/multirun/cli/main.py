"""The ``multirun`` command.

    multirun demo [--dir DIR] [--endpoint URL]    run the bundled example crew, offline
    multirun runs [--dir DIR] [--limit N]         list the runs under DIR/traces
    multirun runs show RUN_ID [--dir DIR]         one run as a tree of its spans
    multirun checkpoints [--run RUN_ID] | show ID | verify [ID ...]
    multirun resume ID -- COMMAND ...             COMMAND's first @run continues run ID (of its name)
    multirun prune --older-than DAYS [--dry-run]  remove old trace files and old runs' checkpoints

DIR defaults to ``$MULTIRUN_DIR``, else ``./.multirun`` (where ``multirun.init_local``
and the embedded default write). Any unique prefix of a run or checkpoint id will do.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import io
import json
import logging
import math
import os
import shlex
import socket
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO, cast

from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor

from multirun import __version__
from multirun import client as client_module
from multirun.cli import checkpoints, prune, render, runs
from multirun.cli.runs import RunsError
from multirun.client import DEFAULT_DIR, MultiRunClient
from multirun.errors import MultiRunError
from multirun.telemetry import export
from multirun.telemetry.local_files import FOLDER_SETTINGS, span_files

COLLECTOR_HINT = "OTEL_EXPORTER_OTLP_ENDPOINT=http://localhost:4318 multirun demo"
NO_RUNS_HINT = (
    "Run `multirun demo` to make one, or a program with a @multirun.run function: without "
    "multirun.init() its runs go to ./.multirun (or $MULTIRUN_DIR)."
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    words, command = checkpoints.split_command(sys.argv[1:] if argv is None else argv)
    try:
        misspelt = _unknown_option(parser, words)
        if misspelt is not None:  # before argparse takes the word after it for a command's name
            misspelt[0].error(misspelt[1])
        args, unknown = parser.parse_known_args(words)
        if unknown:  # refused by the command they were given to, with its usage, not multirun's
            command_parser: argparse.ArgumentParser = getattr(args, "command_parser", parser)
            command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else 2
    if command is not None:
        args.command = command
    handler: Callable[[argparse.Namespace], int] | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 0
    _log_warnings_to_stderr()
    with _ReaderMayLeave.on_stdout():
        try:
            code = handler(args)
            sys.stdout.flush()  # here, where an output that cannot be written fails the command
            return code
        except (RunsError, checkpoints.CommandError, MultiRunError) as exc:
            _error(str(exc))
            return 1
        except KeyboardInterrupt as exc:  # Ctrl-C: a line, not a traceback
            what_is_left = f"; {exc}" if isinstance(exc, checkpoints.Interrupted) else ""
            _to_stderr(f"multirun: interrupted{what_is_left}")
            return 130
        except BrokenPipeError:  # another pipe than stdout: what the command would say is lost
            _silence_stdout()
            return 141  # as a shell reports a command that SIGPIPE ended


# ---------------------------------------------------------------------------
# arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="multirun",
        description="Observe and govern AI agents with OpenTelemetry.",
    )
    parser.add_argument("--version", action="version", version=f"multirun {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    demo = commands.add_parser("demo", help="run the bundled example agents offline and show the run")
    _add_dir(demo, argparse.SUPPRESS)
    demo.add_argument(
        "--endpoint",
        metavar="URL",
        help="send the traces to this OTLP collector (e.g. http://localhost:4318; with "
        "OTEL_EXPORTER_OTLP_PROTOCOL=grpc, http://localhost:4317) instead of files; "
        "OTEL_EXPORTER_OTLP_ENDPOINT does the same",
    )
    demo.set_defaults(handler=cmd_demo)

    runs_parser = commands.add_parser("runs", help="list runs, or show one with `runs show ID`")
    _add_dir(runs_parser, None)
    runs_parser.add_argument(
        "--limit", type=_positive_int, default=20, metavar="N", help="show the N newest (20)"
    )
    runs_parser.add_argument("--json", action="store_true", help="print JSON")
    runs_parser.set_defaults(handler=cmd_runs)
    show_commands = runs_parser.add_subparsers(title="commands", metavar="COMMAND")
    show = show_commands.add_parser("show", help="show one run as a tree of its spans")
    show.add_argument("run_id", metavar="RUN_ID", help="the run id, or any unique prefix of it")
    _add_dir(show, argparse.SUPPRESS)
    show.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
    show.set_defaults(handler=cmd_show)
    checkpoints.add_commands(commands, _add_dir)
    prune.add_command(commands, _add_dir)
    _name_command_parsers(parser)
    return parser


def _name_command_parsers(parser: argparse.ArgumentParser) -> None:
    """Give each command's parser as the default ``command_parser`` of its arguments (the
    innermost command's wins), to refuse an unknown option with that command's usage."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                command.set_defaults(command_parser=command)
                _name_command_parsers(command)


def _unknown_option(
    parser: argparse.ArgumentParser, words: Sequence[str]
) -> tuple[argparse.ArgumentParser, str] | None:
    """The first word of ``words`` that is an option the command it follows does not know, as
    ``(that command's parser, "unrecognized arguments: --word (did you mean --this?)")``, or
    None. After ``resume ID COMMAND`` it is the program's own option: the message says to put
    the program after ``--``.

    argparse sets an unknown option aside and goes on, so in ``multirun runs --limt 3`` it took
    ``3`` for the name of a sub-command of ``runs`` and said only that ``3`` is none.
    """
    current, value_next, positionals = parser, False, 0
    for word in words:
        if value_next:
            value_next = False
            continue
        if word.startswith("--") and word != "--":
            name = word.split("=", 1)[0]
            options = {option: action for action in current._actions for option in action.option_strings}
            matches = [option for option in options if option.startswith(name)]  # argparse's abbreviations
            if name in options or len(matches) == 1:
                action = options[name] if name in options else options[matches[0]]
                value_next = action.nargs != 0 and "=" not in word
                continue
            if matches:  # ambiguous: argparse says so itself
                return None
            if current.prog.endswith(" resume") and positionals > 1:  # resume ID python app.py --x
                return current, f"put the program to run after --, {checkpoints.RESUME_EXAMPLE}"
            close = difflib.get_close_matches(name, [o for o in options if o.startswith("--")], n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            return current, f"unrecognized arguments: {word}{hint}"
        if word.startswith("-"):  # a short option, a negative number, or '-': argparse's to judge
            continue
        positionals += 1
        for action in current._actions:
            if isinstance(action, argparse._SubParsersAction) and word in action.choices:
                current, positionals = action.choices[word], 0
    return None


def _add_dir(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument(
        "--dir",
        default=default,
        type=checkpoints.naming("folder"),
        metavar="DIR",
        help=f"the multirun folder (default: $MULTIRUN_DIR or ./{DEFAULT_DIR})",
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


# ---------------------------------------------------------------------------
# runs, runs show


def cmd_runs(args: argparse.Namespace) -> int:
    """List runs, newest first."""
    directory, named = runs.chosen_directory(args)
    if not named and not runs.exists(directory):
        found: list[runs.RunSummary] = []
    else:
        found = runs.list_runs(directory)
    shown = found[: args.limit]
    if args.json:
        _print_json(render.runs_json(shown))
        return 0
    if not found:
        print(f"No runs in {runs.traces_dir(directory)}.")
        if checkpoints.has_checkpoints_in_folder(args):  # a run killed before its spans were written
            listing, resume = (
                checkpoints.same_place(args, f"multirun {what}") for what in ("checkpoints", "resume")
            )
            print(
                "The checkpoint store has checkpoints, though (of a run killed before its spans were "
                f"written?): `{listing}` lists them, `{resume} ID -- COMMAND` continues a run."
            )
        elif _holds_span_files(directory):  # --dir DIR/traces, as the README names the files
            above = f"multirun runs --dir {shlex.quote(str(directory.parent))}"
            print(f"{directory} holds span files itself: give the folder above it, `{above}`.")
        else:
            print(NO_RUNS_HINT)
        return 0
    lines = render.render_runs(shown, render.terminal_style())
    if len(found) > len(shown):
        lines.append(f"... and {len(found) - len(shown)} older (use --limit)")
    _print_lines(lines)
    return 0


def _holds_span_files(directory: Path) -> bool:
    try:
        return bool(span_files(directory))
    except OSError:
        return False


def cmd_show(args: argparse.Namespace) -> int:
    """One run as a tree of its spans."""
    directory, named = runs.chosen_directory(args)
    if not named and not runs.exists(directory):  # as `multirun runs` there: say how to make one
        _error(f"no run with id {args.run_id!r}: no runs in {runs.traces_dir(directory)}")
        print(NO_RUNS_HINT, file=sys.stderr)
        return 1
    run = runs.resolve(runs.list_runs(directory), args.run_id, checkpoints.same_place(args, "multirun runs"))
    tree = runs.run_tree(runs.trace_spans(directory, run), run)
    if getattr(args, "json", False):
        _print_json(render.tree_json(tree))
    else:
        _print_run(run, tree)
    return 0


# ---------------------------------------------------------------------------
# demo


class _Recorder(SpanProcessor):
    """Keeps the spans that end while it is active (to show a run sent to a collector)."""

    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []
        self.active = True

    def on_end(self, span: ReadableSpan) -> None:
        if self.active:
            self.spans.append(span)

    @classmethod
    def attach(cls, client: MultiRunClient) -> _Recorder:
        """A recorder on the client's provider (it stays empty if spans cannot be watched)."""
        recorder = cls()
        add = getattr(client.tracer_provider, "add_span_processor", None)
        if add is not None:
            add(recorder)
        return recorder


class _ExportErrors(logging.Handler):
    """Collects the errors OpenTelemetry logs while it is attached (an unreachable collector).

    While attached, it also keeps the exporter's retry warnings off the screen:
    the command sums them up in one line instead.
    """

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    @contextlib.contextmanager
    def watching(self) -> Iterator[_ExportErrors]:
        """Attached to the ``opentelemetry`` logger for the duration of the block."""
        logger = logging.getLogger("opentelemetry")
        logger.addHandler(self)
        exports = logging.getLogger(export.__name__)
        exports.addFilter(_not_an_export_failure)  # said in the command's line too
        try:
            yield self
        finally:
            logger.removeHandler(self)
            exports.removeFilter(_not_an_export_failure)


def _not_an_export_failure(record: logging.LogRecord) -> bool:
    return not any(getattr(record, key, False) for key in export.EXPORT_FAILURE)


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the example crew, then show its run and where it went."""
    from multirun import demo

    if client_module._sdk_disabled():  # the run would be neither in the files nor sent
        raise RunsError(
            "OTEL_SDK_DISABLED=true turns OpenTelemetry off, so the demo would record no spans to "
            "show: run it without that variable"
        )
    directory, _ = runs.chosen_directory(args)
    if directory.exists() and not directory.is_dir():
        raise RunsError(f"not a directory: {directory}")
    endpoint: str | None = args.endpoint or demo.endpoint_from_environment()
    _check_demo_endpoint(args.endpoint)
    if endpoint:
        refused = _nothing_listens_at(endpoint)
        if refused is not None:  # known at once; the exporter would retry for seconds first
            _error(f"cannot send the spans to {endpoint}: {refused}")
            print(_NO_COLLECTOR_HINT, file=sys.stderr)
            return 1
    _check_demo_folders(directory, endpoint)
    client = demo.configure(directory, args.endpoint)
    recorder = _Recorder.attach(client) if endpoint else _Recorder()
    interrupted = False
    with _ExportErrors().watching() as errors:
        try:
            result = demo.run_demo()
        except KeyboardInterrupt:
            interrupted = True  # said below, once the flush tells whether the partial run was sent
        except Exception as exc:
            raise RunsError(f"the demo run failed: {type(exc).__name__}: {exc}") from None
        finally:
            sent = _send_now(client, metrics=endpoint is not None) and not _span_failures(errors.messages)
            recorder.active = False
    if interrupted:
        raise checkpoints.Interrupted(_partial_run(directory, endpoint, sent))
    if not result.recorded:  # neither in the files nor sent: not that they could not be
        raise RunsError(_unsampled())
    print("Ran the demo crew offline: a fake model, real model names and prices.")
    if endpoint:
        return _show_sent(recorder, result.run_id, endpoint, errors.messages, client, directory)
    return _show_written(directory, result.run_id, client)


_NO_COLLECTOR_HINT = "Is a collector listening there? Without an endpoint the demo writes files."


def _check_demo_folders(directory: Path, endpoint: str | None) -> None:
    """Create the demo's folder, and refuse it, or a folder in it the demo writes to, that cannot
    be written: before the crew runs, naming --dir (init would name its own argument, and the
    span files' warning MULTIRUN_DIR)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunsError(f"cannot create the folder {directory}: {exc.strerror or exc}") from None
    folders = [directory]
    if not endpoint:
        folders.append(runs.traces_dir(directory))
    if not os.environ.get("MULTIRUN_CHECKPOINT_URI"):
        folders.append(directory / "blobs")
    for folder in folders:  # the ones in it are created when written, if they do not exist yet
        if folder.exists() and not (folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)):
            raise RunsError(f"cannot write to the folder {folder}: give another with --dir DIR")


def _unsampled() -> str:
    """Why the demo's run is neither in the files nor sent: the sampler left it out."""
    chosen = os.environ.get("OTEL_TRACES_SAMPLER")
    if not chosen:
        return "the tracer provider's sampler recorded none of the demo's spans"
    setting = f"OTEL_TRACES_SAMPLER={chosen}"
    argument = os.environ.get("OTEL_TRACES_SAMPLER_ARG")
    if argument:
        setting += f" with OTEL_TRACES_SAMPLER_ARG={argument}"
    return f"the sampler {setting} recorded none of the demo's spans: run it without OTEL_TRACES_SAMPLER"


def _partial_run(directory: Path, endpoint: str | None, sent: bool) -> str:
    """Where the run Ctrl-C cut short is: in the folder, or at the collector if it took it."""
    if not endpoint:
        return f"the partial run is in {directory}: multirun runs --dir {shlex.quote(str(directory))}"
    return (
        f"the partial run is sent to {endpoint}"
        if sent
        else f"the partial run could not be sent to {endpoint}"
    )


def _check_demo_endpoint(given: str | None) -> None:
    """Refuse an endpoint that is no http(s) URL, naming the option or variable that gave it,
    before the demo creates its folder."""
    found = ("--endpoint", given) if given is not None else client_module._env_endpoint("traces")
    protocol = _traces_protocol()
    problem = client_module._endpoint_problem(*found, protocol) if found is not None else None
    if problem is not None:
        raise RunsError(problem)


def _traces_protocol() -> object:
    """The OTLP protocol of the demo's spans (``OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL``)."""
    return client_module._protocol_setting(None, "traces")[0]


def _nothing_listens_at(url: str) -> str | None:
    """Why a TCP connection to ``url``'s host and port failed, or None if it opened (or
    goes through a proxy, or ``url`` names no host: then the exporter says what is wrong)."""
    import urllib.parse
    import urllib.request  # here: it costs every other command its import time

    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return None
    host = parts.hostname
    if not host or (urllib.request.getproxies() and not urllib.request.proxy_bypass(host)):
        return None
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        return f"nothing accepts connections on {host}:{port} ({reason})"
    return None


def _send_now(client: MultiRunClient, metrics: bool) -> bool:
    """Export the spans, and with an endpoint the metrics, while export errors are watched;
    True if the spans' exporter finished in time.

    The metrics would otherwise go at exit, their exporter's retry warnings after the
    command's one-line summary. The two exports retry side by side, so an unreachable
    collector costs the retries of one.
    """
    provider = client_module._owned_meter_provider if metrics else None
    shutdown = getattr(provider, "shutdown", None)  # the provider multirun made for the endpoint
    sending = (
        threading.Thread(target=shutdown, name="multirun-demo-metrics", daemon=True) if shutdown else None
    )
    if sending is not None:
        sending.start()  # a final export, and no second one at exit
    flushed = client.force_flush()
    if sending is not None:
        sending.join()
    return flushed


def _show_written(directory: Path, run_id: str, client: MultiRunClient) -> int:
    """Read the run back from the files, print it, and say where the files are."""
    found = [r for r in runs.list_runs(directory) if r.run_id == run_id]
    if not found:
        where = runs.traces_dir(directory)
        raise RunsError(f"run {run_id} was not found in {where}: its spans could not be written there")
    _print_run(found[0], runs.build_tree(runs.trace_spans(directory, found[0]), found[0].span))
    print()
    print(f"Traces:      {runs.traces_dir(directory)}/*.jsonl (OTLP JSON, one request per line)")
    _print_checkpoints(client, run_id, directory)
    default, _ = runs.chosen_directory(argparse.Namespace())  # where `runs show` reads without --dir
    dir_option = "" if directory == default else f" --dir {shlex.quote(str(directory))}"
    print(f"Again:       multirun runs show {run_id[:12]}{dir_option}")
    print(f"Collector:   {COLLECTOR_HINT}")
    print(f"The code:    {_demo_source()}")
    return 0


def _print_run(run: runs.RunSummary, tree: runs.Node) -> None:
    style = render.terminal_style()
    _print_lines(render.run_heading(run, style))
    print()
    _print_lines(render.render_tree(tree, style))


def _show_sent(
    recorder: _Recorder,
    run_id: str,
    endpoint: str,
    errors: list[str],
    client: MultiRunClient,
    directory: Path,
) -> int:
    """Print the run as recorded in process, and whether the collector took it."""
    records = [runs.record_from_span(span) for span in recorder.spans]
    found = [r for r in runs.find_runs(records) if r.run_id == run_id]
    if found:
        _print_run(found[0], runs.build_tree(records, found[0].span))
        print()
    failed = _span_failures(errors)
    if failed:
        _error(f"could not send the spans to {endpoint}: {failed[0]}")
        print(_NO_COLLECTOR_HINT, file=sys.stderr)
        return 1
    transport = "OTLP/gRPC" if _traces_protocol() == "grpc" else "OTLP/HTTP"
    print(f"Sent:        run {run_id} to {endpoint} ({transport}, service.name multirun-demo)")
    _print_checkpoints(client, run_id, directory)
    print(f"The code:    {_demo_source()}")
    if errors:  # the run arrived; a backend of traces only (Jaeger) refuses the metrics
        hint = " (a traces-only backend such as Jaeger refuses metrics)" if _not_found(errors[0]) else ""
        sent_only = f"the run's spans were sent to {endpoint}, but not its metrics"
        _to_stderr(f"multirun: warning: {sent_only}: {errors[0]}{hint}")
    return 0


def _print_checkpoints(client: MultiRunClient, run_id: str, directory: Path) -> None:
    """A line for each checkpoint of the demo's run, wherever the store is (DIR/blobs, or
    the one ``MULTIRUN_CHECKPOINT_URI`` names)."""
    store = client.checkpoints
    if store is None:
        return
    name = os.environ.get("MULTIRUN_CHECKPOINT_URI") or str(directory / "blobs")
    for location in checkpoints.run_checkpoint_locations(store, run_id, name):
        print(f"Checkpoint:  {location}")


def _span_failures(errors: list[str]) -> list[str]:
    """The export errors that are not the metrics' (the SDK's exporters name the signal)."""
    return [e for e in errors if "metric" not in e.lower()]


def _not_found(error: str) -> bool:
    """An export refused as a path or service the server does not have (HTTP 404, gRPC UNIMPLEMENTED)."""
    return "code: 404" in error or "UNIMPLEMENTED" in error


def _demo_source() -> str:
    from multirun import demo

    return str(Path(demo.__file__ or "demo.py"))


# ---------------------------------------------------------------------------
# output


def _print_lines(lines: Sequence[str]) -> None:
    for line in lines:
        print(line)


def _print_json(data: object) -> None:
    print(_json_text(data))


def _json_text(data: object) -> str:
    """``data`` as ``json.dumps(data, indent=2, default=str)`` writes it, but for NaN and the
    infinities, written as OTLP JSON writes them ("NaN", "Infinity", "-Infinity": JSON has no
    such numbers, and strict parsers refuse Python's), and without recursion: the tree of a
    run handed on hop after hop nests deeper than Python recurses (json.dumps: 500 hops)."""
    out: list[str] = []
    todo: list[str | tuple[str, Any, int]] = [("", data, 0)]  # text, or a value: its lead-in, depth
    while todo:
        entry = todo.pop()
        if isinstance(entry, str):
            out.append(entry)
            continue
        lead_in, value, depth = entry
        if not isinstance(value, (dict, list, tuple)) or not value:
            out.append(lead_in + _json_scalar(value))
            continue
        is_dict = isinstance(value, dict)
        out.append(lead_in + ("{" if is_dict else "["))
        todo.append("\n" + "  " * depth + ("}" if is_dict else "]"))
        items = list(value.items() if isinstance(value, dict) else enumerate(value))
        for i in range(len(items) - 1, -1, -1):  # the first item on top
            key, item = items[i]
            named = json.dumps(str(key)) + ": " if is_dict else ""
            todo.append((("," if i else "") + "\n" + "  " * (depth + 1) + named, item, depth + 1))
    return "".join(out)


def _json_scalar(value: object) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        value = "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return json.dumps(value, default=str)


def _error(message: str) -> None:
    _to_stderr(f"multirun: error: {message}")


def _to_stderr(line: str) -> None:
    """``line`` on stderr, if it can be written: a warning or an error its reader left before
    (``multirun runs 2>&1 | head -1``) changes nothing of what the command does."""
    with contextlib.suppress(OSError, ValueError):  # ValueError: stderr was closed
        print(line, file=sys.stderr)


class _StderrHandler(logging.Handler):
    """``multirun: warning: ...`` on whatever ``sys.stderr`` is now; a folder for the span files
    is named as the command takes it, with --dir."""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage().removeprefix("multirun: ").replace(FOLDER_SETTINGS, "--dir DIR")
        _to_stderr(f"multirun: {record.levelname.lower()}: {message}")


def _log_warnings_to_stderr() -> None:
    logger = logging.getLogger("multirun")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        logger.addHandler(_StderrHandler(logging.WARNING))


class _ReaderMayLeave(io.TextIOBase):
    """The command's stdout: once its reader is gone (``multirun checkpoints verify | head -1``),
    the rest of the output goes nowhere and the command carries on, so that its exit status
    is still its own (a corrupt checkpoint past the first line still fails the command). An
    output that cannot be written (a full disk) is a RunsError, once. Text the output's
    encoding cannot hold is written with backslash escapes, as on stderr."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self.stream = stream
        self.gone = False

    @classmethod
    @contextlib.contextmanager
    def on_stdout(cls) -> Iterator[None]:
        """``sys.stdout`` guarded for the duration of the block, flushed at its end."""
        original = sys.stdout
        if original is None:  # no stdout at all (pythonw): print() writes nothing already
            yield
            return
        guard = cls(original)
        sys.stdout = guarded = cast(TextIO, guard)
        try:
            yield
        finally:
            with contextlib.suppress(RunsError):  # the command's own error is the one to say
                guard.flush()  # now, not at exit, where Python would complain of the closed pipe
            if sys.stdout is guarded:
                sys.stdout = original

    def write(self, text: str) -> int:
        if not self.gone:
            try:
                try:
                    return self.stream.write(text)
                except UnicodeEncodeError:  # a name its encoding (Windows' code page) cannot hold
                    encoding = getattr(self.stream, "encoding", None) or "ascii"
                    self.stream.write(text.encode(encoding, "backslashreplace").decode(encoding))
            except OSError as exc:
                self._failed(exc)
        return len(text)

    def flush(self) -> None:
        if not self.gone:
            try:
                self.stream.flush()
            except OSError as exc:
                self._failed(exc)

    def isatty(self) -> bool:
        return not self.gone and self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self.stream.encoding

    def _failed(self, exc: OSError) -> None:
        """Write nothing more; unless its reader just left, say why the output failed."""
        self.gone = True
        _silence_stdout()  # what is left in the buffer goes to /dev/null at exit
        if not isinstance(exc, BrokenPipeError):
            raise RunsError(f"cannot write the output: {exc.strerror or exc}") from None


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
