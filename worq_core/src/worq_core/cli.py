"""The ``worq`` command line: run workers, enqueue jobs, inspect queues and the dead-letter queue.

Every command that needs an app takes it as ``MODULE:ATTR`` (``myapp:app``), imported with the
current directory on ``sys.path``. The global ``--broker URL`` option (or ``WORQ_BROKER``) points
that app at another broker before it is used. The operator's commands (``stats``, ``jobs``,
``job``, ``dlq``) also run on ``--broker URL`` alone, without the app's code: they then read
the broker through a bare ``Worq(URL)`` and show task names and arguments as stored
(:func:`resolve_app`, :func:`optional_app_argument`).

User mistakes (a bad ``MODULE:ATTR``, an unknown plugin or task, an unreachable broker, bad JSON,
a bad option) print one ``Error: ...`` line to stderr and exit with a non-zero code; only bugs
show a traceback. See ``docs/cli.md`` for the reference.
"""

from __future__ import annotations

import collections
import datetime as dt
import functools
import importlib
import json
import logging
import os
import re
import shlex
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import click
from click.core import ParameterSource

from worq_core import __version__
from worq_core.app import Worq
from worq_core.broker import Broker, redact_url
from worq_core.errors import (
    DeserializationError,
    InvalidNameError,
    JobFailed,
    ResultTimeout,
    TaskError,
    UnsupportedError,
    WorqError,
)
from worq_core.job import Envelope, Job
from worq_core.models import Capability, JobStatus
from worq_core.registry import PluginLoadWarning, default_registry
from worq_core.scheduling import recorded_fires
from worq_core.validation import check_queue
from worq_core.worker import WorkerSettings
from worq_core.worker.scheduler import iso

# Imported by the commands that use them, so that `worq worker` does not load them: rich renders
# the operators' tables; inspection, workflows and the supervisor serve other commands.
if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text
    from rich.tree import Tree

    from worq_core.canvas import Workflow, WorkflowNode
    from worq_core.inspection import JobSummary

_WEIGHT = re.compile(r":\d+$")

LOG_LEVELS = ("debug", "info", "warning", "error")


class CliError(click.ClickException):
    """A user mistake: shown as one ``Error: ...`` line on stderr, exit code 1."""

    def __init__(self, message: str) -> None:
        super().__init__(_one_line(message))


def _one_line(message: str) -> str:
    return "; ".join(part.strip() for part in message.splitlines() if part.strip())


@dataclass(frozen=True, slots=True)
class CliState:
    """Global options, handed to every command through the click context."""

    broker: str | None = None


class WorqGroup(click.Group):
    """The top-level group: turns worq errors and usage errors into one line and an exit code.

    A :class:`~worq_core.errors.WorqError` raised by a command becomes a :class:`CliError`.
    Usage errors (a missing argument, a bad option value) print one line with a pointer to
    ``--help`` instead of click's multi-line usage block.
    """

    def invoke(self, ctx: click.Context) -> Any:
        """Run the command, translating worq errors into :class:`CliError`."""
        with _plugin_warnings_as_lines():
            try:
                return super().invoke(ctx)
            except WorqError as exc:
                raise CliError(str(exc)) from exc

    def list_commands(self, ctx: click.Context) -> list[str]:
        """The commands of worq itself and those plugins add, sorted by name."""
        return sorted({*super().list_commands(ctx), *self._plugin_commands()})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """The command of worq itself of that name, else a plugin's."""
        return super().get_command(ctx, cmd_name) or self._plugin_commands().get(cmd_name)

    def _plugin_commands(self) -> dict[str, click.Command]:
        """Commands from ``worq_register_commands``; worq's own names are never shadowed."""
        with _plugin_warnings_as_lines():
            registry = default_registry()
        return {
            name: command
            for name, command in registry.commands().items()
            if name not in self.commands
        }

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        """Run the command line; with ``standalone_mode`` exit with the command's exit code."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            click.echo(f"Error: {_one_line(exc.format_message())}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


@contextmanager
def _plugin_warnings_as_lines() -> Iterator[None]:
    """Print plugin load warnings as one ``warning: ...`` line each, not Python's two lines."""
    original = warnings.showwarning

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: Any = None,
        line: str | None = None,
    ) -> None:
        if issubclass(category, PluginLoadWarning):
            click.echo(f"warning: {message}", err=True)
        else:
            original(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = original


# -- loading the app ---------------------------------------------------------------------------


def app_broker(spec: str, broker: str | None = None) -> Broker:
    """The broker of the app ``spec`` names, built as the app builds it (for the lease keeper)."""
    return load_app(spec, broker).broker


def load_app(spec: str, broker: str | None = None) -> Worq:
    """Import ``MODULE:ATTR`` and return the :class:`Worq` app it names.

    The current directory goes first on ``sys.path`` (as ``python -m`` does), so ``myapp:app``
    finds ``./myapp.py``. ``ATTR`` may be dotted (``pkg.mod:holder.app``). With ``broker``, the
    app is pointed at that URL through :meth:`Worq.configure` before anything uses it.

    Raises :class:`CliError` for anything the user can fix: a malformed spec, a module that is
    not found or fails to import (named with the file and line), a missing attribute, or an
    attribute that is not a :class:`Worq`.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CliError(f"expected MODULE:ATTR (for example myapp:app), got {spec!r}")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (
            module_name == exc.name or module_name.startswith(f"{exc.name}.")
        ):
            raise CliError(
                f"cannot import {module_name!r}: no such module in {cwd} or on PYTHONPATH"
            ) from exc
        raise CliError(f"importing {module_name!r} failed{_where(exc)}: {_describe(exc)}") from exc
    except Exception as exc:  # any failure of the user's module is reported
        raise CliError(f"importing {module_name!r} failed{_where(exc)}: {_describe(exc)}") from exc
    target: object = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise CliError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not isinstance(target, Worq):
        raise CliError(
            f"{spec} is not a worq_core.Worq app but a {type(target).__qualname__} "
            f"(point at the object created with Worq(...))"
        )
    if broker is not None:
        try:
            target.configure(broker=broker)
        except TaskError as exc:
            raise CliError(
                f"cannot apply --broker {broker}: {spec} already used its broker while "
                f"{module_name!r} was imported ({exc})"
            ) from exc
    return target


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _where(exc: BaseException) -> str:
    """`` (file.py:12)`` for the innermost frame of an exception, or nothing."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f" ({exc.filename}:{exc.lineno})"
    frames = traceback.extract_tb(exc.__traceback__)
    return f" ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""


def _app(state: CliState, spec: str) -> Worq:
    return load_app(spec, _broker_url())


def _broker_url() -> str | None:
    """The broker URL the command was given: its own --broker, else worq --broker or WORQ_BROKER."""
    ctx = click.get_current_context()
    state = ctx.find_object(CliState)
    return ctx.meta.get(_BROKER_KEY) or (state.broker if state is not None else None)


APP_SPEC = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")
"""The shape of ``MODULE:ATTR``: a dotted identifier, a colon, a dotted identifier."""

NO_APP = "give the app as MODULE:ATTR, or the broker as --broker URL (or WORQ_BROKER)"


def looks_like_app(value: str) -> bool:
    """Whether ``value`` is shaped like ``MODULE:ATTR`` (``myapp:app``, ``pkg.mod:holder.app``)."""
    return APP_SPEC.fullmatch(value) is not None


def resolve_app(spec: str | None) -> Worq:
    """The app an operator's command works on: ``MODULE:ATTR`` if given, else the broker URL alone.

    With ``spec`` this is :func:`load_app` pointed at the command's broker options (its own
    ``--broker``, else ``worq --broker`` or ``WORQ_BROKER``), as every command does. Without it
    the broker URL is required: the result is a bare ``Worq(URL)`` with no tasks, which reads
    what the broker holds with the default serializer, so task names and arguments show as
    stored. That app belongs to the command and is closed when the command ends. Must run
    inside a click command; raises :class:`CliError` when there is neither app nor broker.
    """
    broker = _broker_url()
    if spec is not None:
        return load_app(spec, broker)
    if broker is None:
        raise CliError(f"no app and no broker: {NO_APP}")
    app = Worq(broker)
    click.get_current_context().call_on_close(app.close)
    _ = app.broker  # built now, so that a bad URL is reported before any output
    return app


def _console(*, markup: bool = False) -> Console:
    from rich.console import Console

    # Built per call so that it writes to whatever sys.stdout is now (click's test runner swaps it).
    # No markup by default: queue names, reasons and errors are user data, not rich markup.
    console = Console(highlight=False, markup=markup)
    if not console.is_terminal:
        # Piped output has no width to fit; do not truncate ids to rich's default 80 columns.
        console.width = max(console.width, 200)
    return console


def _split_queues(value: str | None) -> list[str] | None:
    if value is None:
        return None
    queues = [q.strip() for q in value.split(",") if q.strip()]
    if not queues:
        raise click.BadParameter("give at least one queue name", param_hint="--queues")
    for name in queues:
        try:
            check_queue(name.rpartition(":")[0] if _WEIGHT.search(name) else name)
        except InvalidNameError as exc:
            raise click.BadParameter(str(exc), param_hint="--queues") from exc
    return queues


# -- the group ---------------------------------------------------------------------------------


@click.group("worq", cls=WorqGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--broker",
    envvar="WORQ_BROKER",
    metavar="URL",
    help="Use this broker instead of the app's own (env: WORQ_BROKER).",
)
@click.version_option(__version__, prog_name="worq")
@click.pass_context
def main(ctx: click.Context, broker: str | None) -> None:
    """worq: background jobs for Python.

    APP arguments are MODULE:ATTR, e.g. myapp:app for `app = Worq(...)` in ./myapp.py.
    stats, jobs, job and dlq also work without it, on --broker URL (or WORQ_BROKER) alone.
    """
    ctx.obj = CliState(broker=broker or None)


_BROKER_KEY = "worq.broker"


def _remember_broker(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value:
        ctx.meta[_BROKER_KEY] = value


def broker_option(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--broker URL`` accepted after the command name too (it wins over ``worq --broker``)."""
    return click.option(
        "--broker",
        metavar="URL",
        expose_value=False,
        callback=_remember_broker,
        help="Use this broker instead of the app's own (same as worq --broker).",
    )(command)


def app_argument(command: Callable[..., Any]) -> Callable[..., Any]:
    """The ``MODULE:ATTR`` argument, and ``--broker`` also accepted after the command name."""
    return click.argument("app_spec", metavar="MODULE:ATTR")(broker_option(command))


def optional_app_argument(command: Callable[..., Any]) -> Callable[..., Any]:
    """An optional ``[MODULE:ATTR]`` argument (``app_spec``, ``None`` if left out) and ``--broker``.

    For commands that can work on a broker URL alone: pass ``app_spec`` to :func:`resolve_app`.
    Use it only where the app is the command's one positional argument.
    """
    return click.argument("app_spec", required=False, metavar="[MODULE:ATTR]")(
        broker_option(command)
    )


# -- worker ------------------------------------------------------------------------------------


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``.

    Job lines add ``job_id``, ``task`` and ``queue``; an exception, if any, is added as
    ``exc_info`` (its formatted traceback).
    """

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        entry: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for extra in ("job_id", "task", "queue"):  # set on every job line by the worker
            if extra in record.__dict__:
                entry[extra] = record.__dict__[extra]
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


@contextmanager
def worker_logging(level: str, fmt: str) -> Iterator[None]:
    """Log to stderr, one line per event, for the duration of the block.

    The handler goes on the root logger so that tasks' own log lines show too; it is removed
    (and the root level restored) afterwards.
    """
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    previous_level = root.level
    root.addHandler(handler)
    root.setLevel(level.upper())
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(previous_level)


@main.command()
@app_argument
@click.option(
    "--queues",
    "-Q",
    metavar="A,B",
    help="Comma-separated queues, highest priority first, or with weights (high:3,default:1: "
    "each fetch draws the order, high first three times as often) [default: every queue the "
    "app's tasks declare].",
)
@click.option(
    "--concurrency",
    "-c",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Jobs run at once in each process.",
)
@click.option(
    "--processes",
    "-p",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Worker processes; more than one starts a supervisor that restarts any that die.",
)
@click.option("--burst", is_flag=True, help="Exit once no job is ready, delayed or running.")
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    metavar="SECONDS",
    help="Time in-flight jobs get to finish after SIGTERM/SIGINT.",
)
@click.option(
    "--lease",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    metavar="SECONDS",
    help="Lease (visibility timeout) of a fetched job; the heartbeat renews it.",
)
@click.option(
    "--prefetch",
    type=click.IntRange(min=0),
    default=16,
    show_default=True,
    metavar="N",
    help="Jobs fetched beyond the free slots while the queues are deep and jobs short; a "
    "process holds at most --concurrency + N leases, all a SIGKILL can leave to run again "
    "(0: fetch only for free slots).",
)
@click.option(
    "--max-jobs-per-process",
    type=click.IntRange(min=1),
    metavar="N",
    help="Replace a worker process (gracefully) after it has handled N jobs.",
)
@click.option(
    "--max-memory-per-process",
    type=click.IntRange(min=1),
    metavar="MIB",
    help="Replace a worker process (gracefully) once its resident memory passes MIB mebibytes.",
)
@click.option(
    "--log-level",
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
    default="info",
    show_default=True,
)
@click.option(
    "--log-format",
    type=click.Choice(("text", "json")),
    default="text",
    show_default=True,
    help="json: one JSON object per line (time, level, logger, message; job_id, task, queue).",
)
@click.option(
    "--scheduler/--no-scheduler",
    default=True,
    show_default=True,
    help="Fire the app's periodic schedules from this worker too (safe in every worker: "
    "each tick fires once across all of them).",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(min=0, max=65535),
    metavar="PORT",
    help="Serve Prometheus metrics at http://HOST:PORT/metrics (needs worq-core[prometheus]); "
    "with --processes, one scrape shows the sum over every process.",
)
@click.option(
    "--metrics-host",
    default="127.0.0.1",
    show_default=True,
    metavar="HOST",
    help="Address --metrics-port binds (0.0.0.0 for every interface).",
)
@click.option("--supervised", is_flag=True, hidden=True)
@click.option("--metrics-child", is_flag=True, hidden=True)
@click.pass_obj
def worker(
    state: CliState,
    app_spec: str,
    queues: str | None,
    concurrency: int,
    processes: int,
    burst: bool,
    grace: float,
    lease: float,
    prefetch: int,
    max_jobs_per_process: int | None,
    max_memory_per_process: int | None,
    log_level: str,
    log_format: str,
    scheduler: bool,
    metrics_port: int | None,
    metrics_host: str,
    supervised: bool,
    metrics_child: bool,
) -> None:
    """Run a worker until SIGTERM/SIGINT, or until idle with --burst.

    The first signal stops fetching and lets running jobs finish within --grace seconds; a
    second one hands unfinished jobs back at once. Exits 0 after a shutdown; with --processes,
    non-zero only if worker processes keep dying.
    """
    weighted = _split_weighted_queues(queues)
    broker = click.get_current_context().meta.get(_BROKER_KEY) or state.broker
    app = load_app(app_spec, broker)
    child = _child_command(
        app_spec,
        broker,
        queues,
        concurrency,
        burst,
        grace,
        lease,
        prefetch,
        max_jobs_per_process,
        max_memory_per_process,
        log_level,
        log_format,
        scheduler,
    )
    shared = Capability.SHARED in app.broker.capabilities
    for option, given in (
        (f"--processes {processes}", processes > 1),
        ("--max-jobs-per-process", max_jobs_per_process is not None),
        ("--max-memory-per-process", max_memory_per_process is not None),
    ):
        if given and not shared:
            # A fresh process would start with an empty broker: every queued job would be lost.
            raise CliError(
                f"{option} needs a broker that processes can share; "
                f"{app.broker.name}:// lives inside one process"
            )
    # Recycling needs someone to start the successor: a supervisor, even for one process.
    if (processes > 1 or max_jobs_per_process or max_memory_per_process) and not supervised:
        with worker_logging(log_level, log_format):
            sys.exit(_supervise(app, child, processes, grace, metrics_host, metrics_port))
    # Any "queue:weight" entry asks for weighted fetching (a:1,b:1 means an equal share).
    use_weights = bool(queues) and ":" in (queues or "")
    weighted = weighted or [(name, 1) for name in app.default_queues()]
    settings = WorkerSettings(
        queues=tuple(name for name, _ in weighted),
        weights=tuple(w for _, w in weighted) if use_weights else None,
        concurrency=concurrency,
        lease=lease,
        grace=grace,
        prefetch=prefetch,
        max_jobs=max_jobs_per_process,
        max_memory=None if max_memory_per_process is None else max_memory_per_process << 20,
        isolated_heartbeat=True,
        # The lease keeper builds its broker from the broker's own recipe when it has one, and
        # else imports the app (its time, memory and module-level side effects) to build it.
        broker_factory=app.broker.recipe() or functools.partial(app_broker, app_spec, broker),
        recycle_when_stuck=supervised,
        stop_when_orphaned=supervised,
        scheduler=scheduler,
    )
    # The app belongs to the user's module, which may still use it: the CLI does not close it.
    with worker_logging(log_level, log_format), _metrics(app, metrics_host, metrics_port):
        if metrics_child:  # the supervisor serves the sum, and reads the broker once for all
            from worq_core.contrib import prometheus

            prometheus.enable(app, broker_metrics=False)
        reason = app.worker(settings=settings).run(burst=burst)
    if supervised and reason.wants_replacement:
        from worq_core.supervisor import REPLACE_ME

        sys.exit(REPLACE_ME)


def _need_prometheus() -> None:
    """Fail with one line when the prometheus extra is missing (imports prometheus_client)."""
    from worq_core.contrib import prometheus

    try:
        prometheus.require()
    except WorqError as exc:
        raise CliError(f"--metrics-port: {exc}") from exc


@contextmanager
def _metrics(app: Worq, host: str, port: int | None) -> Iterator[None]:
    """Record the app's metrics and serve them from this process for the block."""
    if port is None:
        yield
        return
    _need_prometheus()
    from worq_core.contrib import prometheus

    try:
        server = prometheus.MetricsServer(prometheus.enable(app).registry, host, port)
    except OSError as exc:
        raise CliError(f"cannot serve metrics on {host}:{port}: {exc}") from exc
    logging.getLogger("worq.prometheus").info("metrics at %s", server.url)
    try:
        yield
    finally:
        server.close()


def _supervise(
    app: Worq, child: list[str], processes: int, grace: float, host: str, port: int | None
) -> int:
    """Run the supervisor; with a metrics port it serves every child's metrics, summed."""
    from worq_core.supervisor import Supervisor

    if port is None:
        return Supervisor([*child, "--supervised"], processes, grace=grace).run()
    _need_prometheus()
    from worq_core.contrib import prometheus

    try:
        exporter = prometheus.MultiprocessExporter(app.broker, host, port)
    except OSError as exc:
        raise CliError(f"cannot serve metrics on {host}:{port}: {exc}") from exc
    log = logging.getLogger("worq.prometheus")
    log.info("metrics of %d worker processes at %s", processes, exporter.server.url)
    try:
        return Supervisor(
            [*child, "--supervised", "--metrics-child"],
            processes,
            grace=grace,
            env=exporter.child_env(),
            on_exit=exporter.process_exited,
        ).run()
    finally:
        exporter.close()


def _split_weighted_queues(value: str | None) -> list[tuple[str, int]] | None:
    names = _split_queues(value)
    if names is None:
        return None
    weighted = []
    for entry in names:
        name, sep, weight = entry.partition(":")
        if not sep:
            weighted.append((name, 1))
            continue
        if not weight.isdigit() or int(weight) < 1 or not name:
            raise click.BadParameter(
                f"{entry!r}: a weight is a whole number of at least 1, as in high:3",
                param_hint="--queues",
            )
        weighted.append((name, int(weight)))
    return weighted


def _child_command(
    app_spec: str,
    broker: str | None,
    queues: str | None,
    concurrency: int,
    burst: bool,
    grace: float,
    lease: float,
    prefetch: int,
    max_jobs: int | None,
    max_memory: int | None,
    log_level: str,
    log_format: str,
    scheduler: bool,
) -> list[str]:
    """The command line of one supervised worker process with these options."""
    command = [sys.executable, "-m", "worq_core", "worker", app_spec]
    command += ["--concurrency", str(concurrency), "--grace", str(grace), "--lease", str(lease)]
    command += ["--prefetch", str(prefetch)]
    command += ["--log-level", log_level, "--log-format", log_format]
    if broker:
        command += ["--broker", broker]
    if queues:
        command += ["--queues", queues]
    if burst:
        command.append("--burst")
    if max_jobs is not None:
        command += ["--max-jobs-per-process", str(max_jobs)]
    if max_memory is not None:
        command += ["--max-memory-per-process", str(max_memory)]
    if not scheduler:
        command.append("--no-scheduler")
    return command


# -- enqueue -----------------------------------------------------------------------------------


def _parse_json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(
            f"{what} is not valid JSON ({exc.msg}): {text!r}; quote strings, e.g. '\"hello\"'"
        ) from exc


@main.command(context_settings={"show_default": True})
@app_argument
@click.argument("task_name")
@click.argument("args_json", nargs=-1, metavar="[ARGS_JSON]...")
@click.option("--kwargs", "kwargs_json", metavar="JSON", help="Keyword arguments as a JSON object.")
@click.option("--queue", help="Queue to send to [default: the task's own].")
@click.option(
    "--delay",
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    help="Run no earlier than this many seconds from now.",
)
@click.option("--priority", type=int, help="Larger runs first [default: the task's own].")
@click.option("--job-id", help="Job id; enqueueing an id that is still queued adds nothing.")
@click.pass_obj
def enqueue(
    state: CliState,
    app_spec: str,
    task_name: str,
    args_json: tuple[str, ...],
    kwargs_json: str | None,
    queue: str | None,
    delay: float | None,
    priority: int | None,
    job_id: str | None,
) -> None:
    """Enqueue one job of TASK_NAME and print its id.

    Each ARGS_JSON is one positional argument written as JSON (numbers, "strings", [lists],
    {objects}, true, null). Put `--` before arguments that start with a dash.
    """
    args = [_parse_json(text, f"argument {i}") for i, text in enumerate(args_json, 1)]
    kwargs: dict[str, Any] = {}
    if kwargs_json is not None:
        parsed = _parse_json(kwargs_json, "--kwargs")
        if not isinstance(parsed, dict):
            raise CliError(f"--kwargs must be a JSON object, got {kwargs_json!r}")
        kwargs = parsed
    app = _app(state, app_spec)
    if task_name not in app.tasks:
        known = ", ".join(sorted(app.tasks)) or "none"
        raise CliError(f"{app_spec} registers no task named {task_name!r}; registered: {known}")
    options = {"queue": queue, "delay": delay, "priority": priority, "job_id": job_id}
    job = app.enqueue(
        task_name,
        args,
        kwargs,
        **{key: value for key, value in options.items() if value is not None},
    )
    click.echo(job.id)
    if Capability.SHARED not in app.broker.capabilities:
        click.echo(
            f"note: the {app.broker.name} broker lives in this process only; "
            "the job is gone when worq exits",
            err=True,
        )


# -- stats -------------------------------------------------------------------------------------


@main.command()
@optional_app_argument
@click.option("--queues", "-Q", metavar="A,B", help="Only these queues [default: every queue].")
def stats(app_spec: str | None, queues: str | None) -> None:
    """Show job counts per queue, and the live workers.

    Ready, delayed (scheduled or waiting for a retry), running (leased) and dead jobs; then
    each live worker's host, pid, start time, queues, jobs done and jobs running.

    Without --queues: every queue the broker knows of, plus those the app's tasks declare.
    Without MODULE:ATTR, --broker URL (or WORQ_BROKER) says which broker to read.
    """
    from rich.table import Table
    from rich.text import Text

    queue_list = _split_queues(queues)
    app = resolve_app(app_spec)
    broker = app.broker
    if queue_list is not None:
        rows = broker.stats(queue_list)
    else:
        rows = broker.stats()
        known = {row.queue for row in rows}
        missing = [q for q in app.default_queues() if q not in known]
        if missing:
            rows += broker.stats(missing)
        rows.sort(key=lambda row: (row.queue != "default", row.queue))
    table = Table(title=f"{broker.name} broker {broker.shown_url}", title_justify="left")
    table.add_column("queue", no_wrap=True)
    for column in ("ready", "delayed", "running", "dead"):
        table.add_column(column, justify="right")
    for row in rows:
        dead = Text(str(row.dead), style="red" if row.dead else "")
        table.add_row(row.queue, str(row.ready), str(row.delayed), str(row.running), dead)
    console = _console()
    console.print(table)
    if Capability.WORKER_REGISTRY not in broker.capabilities:
        console.print(f"(the {broker.name} broker keeps no registry of live workers)")
        return
    workers = broker.workers()
    if not workers:
        console.print("no live workers")
        return
    listing = Table(title="workers", title_justify="left")
    for column in ("worker", "host", "pid", "started", "queues", "done", "running"):
        listing.add_column(column, no_wrap=column in ("worker", "started"))
    for info in workers:
        listing.add_row(
            info.id,
            info.host,
            str(info.pid),
            _when(info.started),
            ",".join(info.queues),
            str(info.done),
            f"{info.running}/{info.concurrency}",
        )
    console.print(listing)


# -- jobs --------------------------------------------------------------------------------------

JOB_STATES = {
    "queued": JobStatus.QUEUED,
    "scheduled": JobStatus.SCHEDULED,
    "retrying": JobStatus.RETRYING,
    "running": JobStatus.RUNNING,
    "dead": JobStatus.DEAD,
}

_WHEN_COLUMN = {
    JobStatus.QUEUED: "enqueued",
    JobStatus.SCHEDULED: "due",
    JobStatus.RETRYING: "due",
    JobStatus.RUNNING: "lease until",
    JobStatus.DEAD: "died",
}

ARGS_SHOWN = 60
"""Characters of a job's arguments a ``worq jobs`` row shows (``--json`` gives them whole)."""

MAX_JOBS_PAGE = 1000


def _call(args: Sequence[Any], kwargs: dict[str, Any]) -> str:
    """Arguments written as a call's, values as JSON: ``(1, "a", flag=true)``."""
    from worq_core.inspection import show_arguments

    return f"({show_arguments(args, kwargs)})"


def _split_queue_options(values: tuple[str, ...]) -> list[str] | None:
    names: list[str] = []
    for value in values:
        for name in value.split(","):
            name = name.strip()
            if not name:
                raise click.BadParameter("give a queue name", param_hint="--queue")
            try:
                check_queue(name)
            except InvalidNameError as exc:
                raise click.BadParameter(str(exc), param_hint="--queue") from exc
            if name not in names:
                names.append(name)
    return names or None


def _job_json(item: JobSummary) -> str:
    return json.dumps(
        {
            "id": item.id,
            "queue": item.queue,
            "status": item.status.value,
            "task": item.task,
            "args": item.args,
            "kwargs": item.kwargs,
            "headers": item.headers,
            "attempts": item.attempts,
            "enqueued_at": item.enqueued_at,
            "at": item.at,
            "reason": item.reason,
            "workflow": item.workflow,
        },
        ensure_ascii=False,
        default=repr,  # a serializer may hand back values JSON has no type for (bytes)
    )


def _next_page_command(app_spec: str | None, cursor: str) -> str:
    """The command line that lists the next page: this one, with ``--cursor`` replaced."""
    ctx = click.get_current_context()
    params = ctx.params
    words = ["worq", ctx.info_name or "jobs"]
    if app_spec is not None:
        words.append(app_spec)
    root = ctx.find_root()
    given = ctx.meta.get(_BROKER_KEY)
    if given is None and root.get_parameter_source("broker") is ParameterSource.COMMANDLINE:
        given = root.params.get("broker")
    if given:  # a broker from WORQ_BROKER is still in the environment: not repeated
        words += ["--broker", redact_url(given)]
    words += ["--state", params["state"]]
    if params["task"] is not None:
        words += ["--task", params["task"]]
    if params["queues"]:
        words += ["--queue", ",".join(_split_queue_options(params["queues"]) or ())]
    words += ["--limit", str(params["limit"])]
    if params["as_json"]:
        words.append("--json")
    words += ["--cursor", cursor]
    return shlex.join(words)


@main.command()
@optional_app_argument
@click.option(
    "--state",
    "-s",
    type=click.Choice(tuple(JOB_STATES)),
    required=True,
    help="List the jobs in this state.",
)
@click.option("--task", "-t", metavar="NAME", help="Only the jobs of this task.")
@click.option(
    "--queue",
    "-q",
    "queues",
    multiple=True,
    metavar="Q",
    help="Only this queue; repeat it or give A,B for several [default: every queue].",
)
@click.option(
    "--limit",
    type=click.IntRange(min=1, max=MAX_JOBS_PAGE),
    metavar="N",
    default=50,
    show_default=True,
    help="At most this many jobs per page.",
)
@click.option("--cursor", default="", metavar="C", help="Go on where a previous page stopped.")
@click.option(
    "--json", "as_json", is_flag=True, help="One JSON object per job and line, arguments whole."
)
def jobs(
    app_spec: str | None,
    state: str,
    task: str | None,
    queues: tuple[str, ...],
    limit: int,
    cursor: str,
    as_json: bool,
) -> None:
    """List the jobs in a state, a page at a time, with their tasks and arguments.

    Queued jobs in the order they will run, scheduled and retrying ones by due time,
    running ones by lease deadline, dead ones newest first; queues one after another by
    name. Each page reads a bounded number of jobs from the broker (a --task filter may
    return a short page before the end); when there is more, the last line gives the
    command for the next page (on stderr with --json). Without MODULE:ATTR, --broker URL
    (or WORQ_BROKER) says which broker to read.
    """
    from worq_core.inspection import Inspector

    status = JOB_STATES[state]
    names = _split_queue_options(queues)
    app = resolve_app(app_spec)
    page = Inspector(app).jobs(
        status,
        queues=names,
        task=task,
        cursor=cursor,
        limit=limit,
        scan=max(1000, limit),
    )
    hint = f"next page: {_next_page_command(app_spec, page.cursor)}" if page.cursor else ""
    if as_json:
        for item in page.jobs:
            click.echo(_job_json(item))
        if hint:
            click.echo(hint, err=True)
        return
    console = _console()
    if not page.jobs:
        where = f" of task {task!r}" if task is not None else ""
        console.print(f"no {state} jobs{where}" + (" on this page" if hint else ""))
    else:
        _jobs_table(console, page.jobs, status, state)
    if hint:
        console.print(hint, no_wrap=True, overflow="ignore", crop=False)


def _jobs_table(console: Console, found: list[JobSummary], status: JobStatus, state: str) -> None:
    from rich.table import Table

    from worq_core.inspection import UNDECODABLE, truncate

    table = Table(title=f"{state} jobs", title_justify="left")
    # Ids stay whole so they can be copied into `worq job` or `worq dlq requeue`.
    table.add_column("id", no_wrap=True, min_width=max(len(item.id) for item in found))
    table.add_column("queue", overflow="fold")
    table.add_column("task", overflow="fold")
    table.add_column("attempts", justify="right", no_wrap=True)
    table.add_column(_WHEN_COLUMN[status], no_wrap=True)
    table.add_column("arguments", overflow="fold", ratio=1)
    dead = status is JobStatus.DEAD
    if dead:
        table.add_column("reason", overflow="fold", ratio=1)
    for item in found:
        at = item.enqueued_at if status is JobStatus.QUEUED else item.at
        arguments = "" if item.task == UNDECODABLE else _call(item.args, item.kwargs)
        cells = [
            item.id,
            item.queue,
            item.task,
            str(item.attempts),
            _when(at) if at is not None else "",
            truncate(arguments, ARGS_SHOWN),
        ]
        if dead:
            cells.append(truncate(item.reason, 200))
        table.add_row(*cells)
    console.print(table)


# -- schedule ----------------------------------------------------------------------------------


@main.command()
@app_argument
@click.pass_obj
def schedule(state: CliState, app_spec: str) -> None:
    """List the app's periodic schedules with their last and next ticks.

    The last tick is the one the broker recorded (fired by any worker, or passed over as
    missed under missed="skip"); "none yet" with the time a scheduler first saw the schedule
    when no tick has come since. The next is the trigger's first tick after now, or after the
    last tick if that is later. Times are UTC.
    """
    from rich.table import Table

    app = _app(state, app_spec)
    schedules = list(app.schedules.values())
    console = _console()
    if not schedules:
        console.print("no schedules")
        return
    broker = app.broker
    if Capability.SCHEDULES not in broker.capabilities:
        raise CliError(f"the {broker.name} broker cannot keep schedules")
    records = recorded_fires(broker, schedules)
    now = time.time()
    table = Table(
        title=f"schedules on {broker.name} broker {broker.shown_url}", title_justify="left"
    )
    for column in ("schedule", "task", "trigger", "missed", "last tick", "next tick"):
        table.add_column(column, no_wrap=column in ("last tick", "next tick"))
    for item in schedules:
        last = records.get(item.key)
        upcoming = item.trigger.next_after(now if last is None else max(now, last))
        if last is None:
            shown = "never seen"
        elif item.trigger.last_at(last) == last:
            shown = iso(last)
        else:  # the scheduler's first record is the moment it saw the schedule, not a tick
            shown = f"none yet (seen {iso(last)})"
        table.add_row(
            item.name,
            item.task.name,
            item.trigger.describe(),
            item.missed.value,
            shown,
            iso(upcoming),
        )
    console.print(table)


# -- job ---------------------------------------------------------------------------------------


@main.command()
@broker_option
@click.argument("values", nargs=-1, required=True, metavar="[MODULE:ATTR] JOB_ID")
@click.option("--cancel", is_flag=True, help="Cancel the job (a running one is told to stop).")
def job(values: tuple[str, ...], cancel: bool) -> None:
    """Show a job's status, progress, and result or error; or --cancel it.

    Two values are the app and the job id; one is the job id alone, read from the broker
    that --broker URL (or WORQ_BROKER) names. Job ids are unique across the app's queues, so
    no queue is needed. Exits 1 if the job is unknown (never enqueued, or its result
    expired), or if --cancel found nothing to cancel.
    """
    if len(values) > 2:
        raise click.UsageError(
            f"expected [MODULE:ATTR] JOB_ID, got {len(values)} values; give one job id at a time"
        )
    if len(values) == 1 and looks_like_app(values[0]) and _broker_url() is None:
        raise click.UsageError("Missing argument 'JOB_ID' after MODULE:ATTR")
    app_spec, job_id = (None, values[0]) if len(values) == 1 else values
    app = resolve_app(app_spec)
    handle = app.job(job_id)
    if cancel:
        try:
            cancelled = handle.cancel()
        except UnsupportedError as exc:
            raise CliError(str(exc)) from exc
        if not cancelled:
            raise CliError(f"job {job_id} is not queued or running: nothing to cancel")
        click.echo(f"job {job_id}: cancellation requested ({handle.status().value})")
        return
    status = handle.status()
    workflow = app.workflow(job_id)
    if status is JobStatus.UNKNOWN and workflow is None:
        hint = ""
        if app_spec is None and looks_like_app(job_id):
            hint = f" (to name the app, give it before the id: worq job {job_id} JOB_ID)"
        raise CliError(
            f"job {job_id} is unknown: never enqueued, or finished so long ago that its "
            f"result expired{hint}"
        )
    if status is not JobStatus.UNKNOWN:
        _show_job(app, handle, status)
    if workflow is not None:
        _show_workflow(workflow, job_id)


def _show_job(app: Worq, handle: Job[Any], status: JobStatus) -> None:
    from worq_core.inspection import UNDECODABLE, Inspector, show_value

    job_id = handle.id
    where = app.broker.job_state(job_id)
    click.echo(f"job:    {job_id}")
    if where is not None:
        click.echo(f"queue:  {where.queue}")
        click.echo(f"tries:  {where.attempts}")
    click.echo(f"status: {status.value}")
    held = None
    if Capability.LISTING in app.broker.capabilities:
        entry = app.broker.find_job(job_id)
        held = None if entry is None else Inspector(app).summary(entry)
    if held is not None:  # its body, as stored: no task code needed to show it
        click.echo(f"task:   {held.task}")
        if held.task != UNDECODABLE:
            click.echo(f"args:   {_call(held.args, held.kwargs)}")
    progress = handle.progress() if status is JobStatus.RUNNING else None
    if progress is not None:
        count = f" ({progress.current:g}/{progress.total:g})" if progress.total is not None else ""
        message = f" {progress.message}" if progress.message else ""
        click.echo(f"progress: {progress.fraction:.0%}{count}{message}")
    if where is not None and where.cancel_requested:
        click.echo("cancel: requested; the worker is telling the task")
    if status is JobStatus.SUCCEEDED:
        click.echo(f"result: {show_value(handle.result(timeout=0))}")
    elif status is JobStatus.DEAD:
        try:
            handle.result(timeout=0)
        except JobFailed as failed:
            click.echo(f"error:  {failed.error_type}: {failed.message}")
            if failed.traceback:
                click.echo(failed.traceback.rstrip())
        except ResultTimeout:
            # Dead-lettered, but the result storage holds no record: show the broker's reason.
            queue = where.queue if where is not None else "default"
            reason = next(
                (d.reason for d in app.broker.dead_jobs(queue, 10_000) if d.id == job_id), ""
            )
            click.echo(f"error:  {reason or 'unknown'}")


SHOWN_MEMBERS = 20
"""A group with more members shows only those that have not succeeded, this many at most."""


def _show_workflow(workflow: Workflow, asked: str) -> None:
    from rich.tree import Tree

    where = workflow.status()
    tree = workflow.tree()
    click.echo(
        f"workflow: {workflow.id} {where.status.value} at step {where.step + 1} ({where.task})"
    )
    console = _console()
    console.print(_branch(Tree(_label(tree, asked)), tree, asked))


def _label(node: WorkflowNode, asked: str) -> Text:
    from rich.text import Text

    status = "not sent" if node.status is JobStatus.UNKNOWN else node.status.value
    if node.kind == "task":
        label = Text(f"{node.task} {node.id} ")
    elif node.kind == "group":
        counts = collections.Counter(child.status for child in node.children)
        parts = ", ".join(
            f"{n} {'not sent' if s is JobStatus.UNKNOWN else s.value}" for s, n in counts.items()
        )
        label = Text(f"group of {len(node.children)} ({parts}) ")
    else:
        label = Text(f"{node.kind} ")
    label.append(status, style="bold")
    if node.id == asked:
        label.append("  <- this", style="bold")
    return label


def _branch(tree: Tree, node: WorkflowNode, asked: str) -> Tree:
    from rich.text import Text

    children = node.children
    hidden = 0
    if node.kind == "group" and len(children) > SHOWN_MEMBERS:
        shown = [c for c in children if c.status is not JobStatus.SUCCEEDED or _holds(c, asked)]
        hidden = len(children) - len(shown[:SHOWN_MEMBERS])
        children = tuple(shown[:SHOWN_MEMBERS])
    for child in children:
        _branch(tree.add(_label(child, asked)), child, asked)
    if hidden:
        tree.add(Text(f"... {hidden} more"))
    return tree


def _holds(node: WorkflowNode, job_id: str) -> bool:
    return node.id == job_id or any(_holds(child, job_id) for child in node.children)


# -- dlq ---------------------------------------------------------------------------------------


@main.group()
def dlq() -> None:
    """Inspect and manage a queue's dead-letter queue."""


def _dead_letter_app(app_spec: str | None) -> Worq:
    app = resolve_app(app_spec)
    if Capability.DEAD_LETTER not in app.broker.capabilities:
        raise CliError(f"the {app.broker.name} broker keeps no dead-letter queue")
    return app


def _task_of(body: bytes, app: Worq) -> str:
    try:
        return Envelope.decode(body, app.serializer).task
    except DeserializationError:
        return "<undecodable>"


def _when(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


queue_option = click.option(
    "--queue", "-q", default="default", show_default=True, help="The queue whose DLQ to use."
)


@dlq.command("list")
@optional_app_argument
@queue_option
@click.option(
    "--limit", type=click.IntRange(min=1), default=100, show_default=True, help="At most this many."
)
def dlq_list(app_spec: str | None, queue: str, limit: int) -> None:
    """List dead jobs, newest first.

    Shows each job's id, task, attempts, when it died and why. Without MODULE:ATTR, --broker
    URL (or WORQ_BROKER) says which broker to read.
    """
    from rich.table import Table
    from rich.text import Text

    app = _dead_letter_app(app_spec)
    dead = app.broker.dead_jobs(queue, limit)
    console = _console()
    if not dead:
        console.print(f"no dead jobs in queue {queue!r}")
        return
    rows = [
        (item.id, _task_of(item.body, app), str(item.attempts), _when(item.died_at), item.reason)
        for item in dead
    ]
    id_width = max(len(item.id) for item in dead)
    if console.width < id_width + 70:
        # Too narrow for a table that keeps ids whole: one header line per job, reason below.
        for job_id, task, attempts, died_at, reason in rows:
            console.print(
                Text.assemble((job_id, "bold"), f"  {task}  attempts {attempts}  died {died_at}"),
                no_wrap=True,
                overflow="ignore",
            )
            console.print(Text(f"    {reason}", style="red"))
        return
    table = Table(title=f"dead jobs in {queue!r}", title_justify="left")
    # Ids stay whole so they can be copied into `worq dlq requeue`; the reason wraps instead.
    table.add_column("id", no_wrap=True, min_width=id_width)
    table.add_column("task", overflow="fold")
    table.add_column("attempts", justify="right", no_wrap=True)
    table.add_column("died at", no_wrap=True)
    table.add_column("reason", overflow="fold", ratio=1)
    for cells in rows:
        table.add_row(*cells)
    console.print(table)


@dlq.command("requeue")
@broker_option
@click.argument("values", nargs=-1, metavar="[MODULE:ATTR] [JOB_ID]...")
@queue_option
def dlq_requeue(values: tuple[str, ...], queue: str) -> None:
    """Move dead jobs back to their queue.

    All of them, or only the JOB_IDs given; their attempts start again from zero. Exits 1 if
    some of the ids given were not dead. A first value shaped like MODULE:ATTR (myapp:app,
    pkg.mod:app) names the app; without one, --broker URL (or WORQ_BROKER) says which broker.
    """
    app_spec = values[0] if values and looks_like_app(values[0]) else None
    job_ids = values[1:] if app_spec is not None else values
    app = _dead_letter_app(app_spec)
    moved = app.requeue_dead(queue, list(job_ids) if job_ids else None)
    click.echo(f"requeued {moved} job{'s' if moved != 1 else ''} in queue {queue!r}")
    if job_ids and moved < len(job_ids):
        raise CliError(
            f"{len(job_ids) - moved} of the {len(job_ids)} ids given were not in the "
            f"dead-letter queue of {queue!r}"
        )


@dlq.command("purge")
@optional_app_argument
@queue_option
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def dlq_purge(app_spec: str | None, queue: str, yes: bool) -> None:
    """Delete every dead job of a queue.

    Asks for confirmation unless --yes is given. Without MODULE:ATTR, --broker URL (or
    WORQ_BROKER) says which broker.
    """
    app = _dead_letter_app(app_spec)
    count = app.broker.stats([queue])[0].dead
    if count == 0:
        click.echo(f"no dead jobs in queue {queue!r}")
        return
    if not yes:
        click.confirm(f"Delete {count} dead jobs of queue {queue!r} for good?", abort=True)
    purged = app.broker.purge_dead(queue)
    click.echo(f"purged {purged} dead job{'s' if purged != 1 else ''} from queue {queue!r}")


# -- dashboard ---------------------------------------------------------------------------------


@main.command(context_settings={"show_default": True})
@optional_app_argument
@click.option("--host", default="127.0.0.1", help="Interface to bind (0.0.0.0 exposes it).")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, help="Port to serve on.")
@click.option("--read-only", is_flag=True, help="Show everything; allow no action.")
@click.option(
    "--allowed-host",
    "allowed_hosts",
    multiple=True,
    metavar="NAME",
    help="Another host name to answer to (behind a proxy); repeatable.",
)
@click.option(
    "--refresh",
    type=click.FloatRange(min=0.2),
    default=2.0,
    help="Seconds between a page's live updates.",
)
def dashboard(
    app_spec: str | None,
    host: str,
    port: int,
    read_only: bool,
    allowed_hosts: tuple[str, ...],
    refresh: float,
) -> None:
    """Serve the web dashboard: queues, jobs, dead letters, workers and schedules.

    Needs the extra: pip install 'worq-core[dashboard]'. Binds to 127.0.0.1 unless --host
    says otherwise. Actions (cancel, requeue, purge) are POSTs carrying a token that is made
    fresh at each start and embedded in the pages; --read-only leaves them out. Without
    MODULE:ATTR, --broker URL (or WORQ_BROKER) says which broker to show.
    """
    try:
        from worq_core.dashboard import DashboardConfig, hosts_for, serve
    except ImportError as exc:
        raise CliError(
            f"the dashboard needs its extra ({exc.name} is missing): "
            "pip install 'worq-core[dashboard]'"
        ) from exc
    app = resolve_app(app_spec)
    config = DashboardConfig(
        read_only=read_only,
        allowed_hosts=hosts_for(host, allowed_hosts),
        refresh_seconds=refresh,
    )
    shown = f"[{host}]" if ":" in host else host
    click.echo(
        f"worq dashboard for {app.broker.name} {app.broker.shown_url} at http://{shown}:{port}/"
        + (" (read-only)" if read_only else "")
    )
    try:
        serve(app, host, port, config)
    except SystemExit as exc:  # uvicorn exits 1 when it cannot bind
        raise CliError(f"cannot serve on {host}:{port} (is the port in use?)") from exc


# -- plugins -----------------------------------------------------------------------------------


@main.command()
def plugins() -> None:
    """List installed plugins and what they register.

    Shows every plugin found through the `worq` entry points: its distribution, version, the
    brokers, storages and serializers it registers (with URL schemes), and load errors.
    """
    from rich.table import Table
    from rich.text import Text

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PluginLoadWarning)  # shown in the table instead
        registry = default_registry()
    table = Table(title="worq plugins", title_justify="left")
    table.add_column("distribution", no_wrap=True)
    table.add_column("version", no_wrap=True)
    table.add_column("plugin", no_wrap=True)
    table.add_column("registers")
    failed = 0
    for record in sorted(registry.plugins, key=lambda r: (r.distribution, r.name)):
        if record.error is not None:
            failed += 1
            provides = Text(f"failed to load: {record.error}", style="red")
        else:
            lines = [
                f"{c.kind} {c.name}"
                + (f" ({', '.join(f'{s}://' for s in c.schemes)})" if c.schemes else "")
                for c in record.components
            ]
            for name in record.commands:
                shadowed = " (shadowed by worq's own: left out)" if name in main.commands else ""
                lines.append(f"command worq {name}{shadowed}")
            provides = Text("\n".join(lines) or "nothing")
        table.add_row(record.distribution, record.version, record.name, provides)
    console = _console()
    console.print(table)
    if not registry.plugins:
        console.print("no worq plugins installed: pip install worq-core worq-memory")
    if failed:
        console.print(Text(f"{failed} plugin(s) failed to load", style="red"))


# -- demo --------------------------------------------------------------------------------------


@main.command()
@click.option(
    "--jobs",
    "-n",
    type=click.IntRange(min=1),
    default=5000,
    show_default=True,
    help="How many jobs to enqueue.",
)
@click.option(
    "--concurrency",
    "-c",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Worker concurrency.",
)
@click.option("--seed", type=int, help="Seed the flaky task's failures, for a repeatable run.")
def demo(jobs: int, concurrency: int, seed: int | None) -> None:
    """Run thousands of jobs in memory, with a progress bar.

    Real jobs through a real worker on memory://; needs worq-memory. Some jobs fail and are
    retried, one is dead-lettered on purpose; ends with a summary table. Ignores --broker:
    everything stays in this process.
    """
    from worq_core.demo import DemoError, run_demo

    console = _console(markup=True)
    try:
        summary = run_demo(jobs, concurrency, console, seed=seed)
    except DemoError as exc:
        raise CliError(str(exc)) from exc
    if summary.mismatches:
        raise CliError(f"{summary.mismatches} sampled results were wrong")


__all__ = ["CliError", "JsonLogFormatter", "WorqGroup", "load_app", "main", "worker_logging"]

if __name__ == "__main__":
    main()
