"""The command line: argv -> config -> pipeline -> NDJSON; errors -> exit codes.

Stdout carries records only; logs, progress and the summary go to stderr. Exit status:
0 every prompt has a record, 1 some prompts failed (see the failures file), 2 bad config or
input, 130 interrupted before the end.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, NamedTuple

import anyio

from . import __version__, _early
from ._config import Config, check_environment, load_config
from ._exceptions import (
    ConfigError,
    EngineUnavailable,
    FileBusy,
    JudgeUnavailable,
    PoolUnavailable,
    SinkError,
    SourceError,
    StreamFeedbackError,
)
from ._files import hold, is_regular, names
from ._idset import IdSet
from ._pipeline import Mode, Pipeline, unwrap_group
from ._pricing import judge_cost
from ._progress import show_progress
from ._stages.sink import NdjsonWriter, drain, read_done_ids
from ._stages.source import open_source
from ._total import Total

if TYPE_CHECKING:
    from .metrics import MetricsServer

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

log = logging.getLogger("streamfeedback")

EXIT_OK, EXIT_FAILURES, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    args.verbose += args.sub_verbose
    args.quiet += args.sub_quiet
    _setup_logging(args.verbose - args.quiet)
    _early.release()
    try:
        return _main(parser, args)
    except BrokenPipeError:
        # the reader of our stdout went away (`| head -1`): normal in a pipeline
        _silence_stdout()
        log.debug("stdout: the reader went away; stopped")
        return EXIT_OK


def _main(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        if args.command == "validate":
            return anyio.run(_validate, args)
        if getattr(args, "limit", None) == 0:
            log.warning("--limit 0 takes no prompts: nothing to do")
            return EXIT_OK
        if args.command in ("run", "generate", "rate"):
            return _run_blocking(args)
        if args.command == "bench":
            from ._bench import main as bench_main

            return bench_main(args)
        if args.command in _TOOLS:
            return int(args.tool_main(args))
    except (ConfigError, SourceError, FileBusy) as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    except SinkError as exc:
        log.error("%s", exc)
        return EXIT_FAILURES
    except KeyboardInterrupt:
        log.error("interrupted")
        return EXIT_INTERRUPTED
    parser.print_help(sys.stderr)
    return EXIT_USAGE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamfeedback",
        description="Stream prompts through a pool of LLMs and a judge; NDJSON records out.",
    )
    parser.add_argument("--version", action="version", version=f"streamfeedback {__version__}")
    _verbosity(parser, "")
    # -v and -q also after the subcommand (`run cfg -v`): the same flags under other names,
    # added up in main(), since a subcommand's defaults would overwrite the main parser's
    common = argparse.ArgumentParser(add_help=False)
    _verbosity(common, "sub_")
    sub = parser.add_subparsers(dest="command")

    run = sub.add_parser(
        "run", help="run the pipeline; records to stdout (or -o)", parents=[common]
    )
    generate = sub.add_parser(
        "generate",
        help="generation only: spool the responses, rate them later with `rate`",
        parents=[common],
    )
    rate = sub.add_parser(
        "rate", help="rating only: rate what a spool holds; records out", parents=[common]
    )
    validate = sub.add_parser(
        "validate", help="check the config and print the plan", parents=[common]
    )
    for cmd in (run, generate, rate, validate):
        cmd.add_argument("config", help="the TOML config")
        cmd.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config key (repeatable), e.g. --set rater.model=gpt-4o",
        )
    for cmd in (run, generate, rate):
        cmd.add_argument(
            "--no-progress",
            dest="progress",
            action="store_false",
            help="no progress view on stderr (a live line on a terminal, else every 30 s)",
        )
        cmd.add_argument(
            "--progress-every",
            type=float,
            metavar="SECONDS",
            help="progress interval (default: 0.5 on a terminal, 30 otherwise)",
        )
        cmd.add_argument(
            "--no-resume",
            dest="resume",
            action="store_false",
            help="do not skip prompts already present in the output file (or the spool)",
        )
    for cmd in (run, rate):
        cmd.add_argument("-o", "--output", help="write records to PATH (appends; '-' is stdout)")
    for cmd in (run, generate):
        cmd.add_argument(
            "--limit", type=_count, help="take only the first N prompts of the source"
        )
        cmd.add_argument(
            "--shard",
            type=_shard,
            metavar="I/N",
            help="take every N-th prompt starting at the I-th (0-based): N runs, one per "
            "host, cover the source once and their outputs concatenate",
        )
    run.add_argument("--spool", help="the spool file (default: beside a file output)")
    for cmd in (run, generate, rate):
        cmd.add_argument(
            "--metrics-port",
            type=int,
            metavar="PORT",
            help="serve Prometheus metrics at http://127.0.0.1:PORT/metrics while the run "
            "works (default: [pipeline] metrics_port)",
        )
    generate.add_argument(
        "--spool", help="the spool file (default: [spool] path, or beside the output file)"
    )
    rate.add_argument("--spool", required=True, help="the spool file to rate")

    validate.add_argument(
        "--probe",
        action="store_true",
        help="also ask each OpenAI-compatible endpoint for its models (GET /models)",
    )

    bench = sub.add_parser(
        "bench", help="throughput benchmark on simulated engines", parents=[common]
    )
    from ._bench import configure_parser as configure_bench

    configure_bench(bench)

    for name in _TOOLS:
        module = importlib.import_module(f"streamfeedback._tools.{name}")
        tool = sub.add_parser(
            name, help=module.HELP, description=module.__doc__, parents=[common]
        )
        module.configure_parser(tool)
        tool.set_defaults(tool_main=module.main)
    return parser


# Commands that work on a run's output, each a module of `streamfeedback._tools` with
# HELP, configure_parser(parser) and main(args) -> exit status.
_TOOLS = ("export", "binarize", "report")


class _StderrFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        # on a terminal, clear the live progress line before a log line takes its place
        self.prefix = "\r\x1b[K" if sys.stderr.isatty() else ""

    def format(self, record: logging.LogRecord) -> str:
        return f"{self.prefix}streamfeedback: {record.levelname.lower()}: {record.getMessage()}"


def _verbosity(parser: argparse.ArgumentParser, prefix: str) -> None:
    parser.add_argument(
        "-v",
        "--verbose",
        dest=f"{prefix}verbose",
        action="count",
        default=0,
        help="more on stderr: -v each request and retry, -vv connections too",
    )
    parser.add_argument(
        "-q",
        "--quiet",
        dest=f"{prefix}quiet",
        action="count",
        default=0,
        help="less on stderr: -q warnings and errors only, -qq errors only",
    )


def _count(text: str) -> int:
    """Parse `--limit N`: a whole number, 0 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be 0 or more")
    return value


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush at exit does not
    report the closed pipe again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    finally:
        os.close(devnull)


def _shard(text: str) -> tuple[int, int]:
    """Parse `--shard I/N`."""
    i, sep, n = text.partition("/")
    try:
        index, count = int(i), int(n)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected I/N, e.g. 0/4") from None
    if not sep or count < 1 or not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"{text!r}: expected I/N with 0 <= I < N")
    return index, count


def _setup_logging(level: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_StderrFormatter())
    root = logging.getLogger("streamfeedback")
    root.handlers[:] = [handler]
    root.propagate = False
    root.setLevel(
        {-1: logging.WARNING, 0: logging.INFO}.get(
            level, logging.DEBUG if level > 0 else logging.ERROR
        )
    )
    # -v: every HTTP request with its status (the OpenAI backend logs one line each at DEBUG;
    # the SDK's Batch API client through httpx); -vv: connections. None logs headers, so no
    # key reaches stderr.
    logging.getLogger("streamfeedback.connections").setLevel(
        logging.DEBUG if level >= 2 else logging.WARNING
    )
    libraries = (("httpx", 1), ("httpx2", 1), ("httpcore", 2), ("httpcore2", 2))
    for name, needed in libraries:
        lib = logging.getLogger(name)
        lib.handlers[:] = [handler] if level >= needed else []
        lib.propagate = False
        lib.setLevel(logging.DEBUG if level >= needed else logging.WARNING)


async def _validate(args: argparse.Namespace) -> int:
    """Print the plan, then make every check `run` makes before its first request."""
    from ._validate import check_source, plan, probe

    path = args.config
    config = load_config(path, args.overrides)
    sys.stdout.write(plan(config, path))
    sys.stdout.flush()
    try:
        check_environment(config, path)
        _metrics_port(config, path, None)
        log.info("%s", await check_source(config))
        if args.probe:
            for line in await probe(config, path):
                log.info("%s", line)
    except (ConfigError, SourceError) as exc:
        log.error("%s (the run would stop here)", exc)
        return EXIT_USAGE
    return EXIT_OK


def _metrics_port(config: Config, path: str, flag: int | None) -> tuple[int, str] | None:
    """The port to serve metrics on and the key that set it, or None for no metrics.

    :raises ConfigError: a port out of range, or `prometheus_client` missing.
    """
    if flag is None and config.pipeline.metrics_port is None:
        return None
    key = "--metrics-port" if flag is not None else "pipeline.metrics_port"
    port = flag if flag is not None else config.pipeline.metrics_port
    assert port is not None
    if not 1 <= port <= 65535:
        raise ConfigError(path, key, f"{port} is not a TCP port (1 to 65535)")
    if importlib.util.find_spec("prometheus_client") is None:
        raise ConfigError(
            path,
            key,
            "metrics need prometheus_client: pip install 'streamfeedback[metrics]'",
        )
    return port, key


async def _metrics_server(config_path: str, where: tuple[int, str]) -> MetricsServer:
    """A started `MetricsServer`, so a port in use stops the run before any work.

    :raises ConfigError: naming the port and why it cannot be bound.
    """
    from .metrics import MetricsServer

    port, key = where
    server = MetricsServer(port)
    try:
        await server.start()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(
            config_path, key, f"cannot serve metrics on 127.0.0.1:{port}: {reason}"
        ) from None
    return server


class _Held(NamedTuple):
    """A file locked for the run, released when it ends."""

    fd: int
    path: str
    drop_if_empty: bool = False
    """A failures file nothing failed into: no file is left behind."""


def _run_blocking(args: argparse.Namespace) -> int:
    backend_options = {"use_uvloop": True} if sys.platform != "win32" else {}
    held: list[_Held] = []
    try:
        return anyio.run(_run, args, held, backend="asyncio", backend_options=backend_options)
    finally:
        for lock in held:
            empty = lock.drop_if_empty and os.fstat(lock.fd).st_size == 0
            if empty and names(lock.fd, lock.path, follow=False):  # a regular file, no symlink
                with contextlib.suppress(OSError):
                    os.unlink(lock.path)  # still locked: no other run is using it
            os.close(lock.fd)


def _prepare(
    args: argparse.Namespace, config: Config, held: list[_Held]
) -> tuple[str, str, str | None, IdSet]:
    """Output, failures and spool paths, and the ids already in the output (a resumed run
    skips them); locks the output and the failures file for the run (their fds go to `held`),
    then repairs a torn last line left by a crash.

    :raises ConfigError: `generate` with nowhere to spool.
    :raises FileBusy: another run holds the output or the failures file.
    """
    out = getattr(args, "output", None) or config.output.path
    if args.command == "generate":
        out = "-"
    failures_path = config.output.failures
    if getattr(args, "output", None) and args.output != "-":
        failures_path = f"{args.output}.failures.ndjson"
    elif args.command == "generate" and args.spool:
        failures_path = f"{args.spool}.failures.ndjson"  # shards of one config: one each
    spool = args.spool or config.spool.path
    if spool is None and config.output.path != "-" and args.command == "generate":
        spool = f"{config.output.path}.spool.ndjson"
    if spool is None and out != "-":
        spool = f"{out}.spool.ndjson"
    if spool is None and args.command == "generate":
        raise ConfigError(args.config, "spool.path", "generate needs a spool: pass --spool FILE")
    skip = IdSet()
    if out != "-":
        held.append(_Held(hold(out), out))
    if out != "-" and args.resume and os.path.getsize(out):
        skip, torn = read_done_ids(out)
        if torn:
            log.warning("%s: cut a torn last line (%d bytes) left by an interrupted run", out, torn)
        log.info("resuming: %d prompts already in %s will be skipped", len(skip), out)
    if spool is not None and not args.resume and args.command != "rate":
        if os.path.exists(spool) and os.path.getsize(spool):
            raise ConfigError(
                args.config,
                "spool.path",
                f"--no-resume would generate again what {spool} holds: move it away first",
            )
    # Two runs on one failures file (both writing records to stdout, say: shards) would wipe
    # each other's failures; a failed prompt is retried by a rerun, so each run starts it empty.
    if failures_path != "-":
        fd = hold(failures_path)
        held.append(_Held(fd, failures_path, drop_if_empty=True))
        if is_regular(fd):
            os.ftruncate(fd, 0)
    return out, failures_path, spool, skip


async def _run(args: argparse.Namespace, held: list[_Held]) -> int:
    config = load_config(args.config, args.overrides)
    check_environment(config, args.config)
    out, failures_path, spool, skip = _prepare(args, config, held)
    mode: Mode = (
        "generate" if args.command == "generate" else "rate" if args.command == "rate" else "run"
    )
    metrics_at = _metrics_port(config, args.config, args.metrics_port)
    metrics = await _metrics_server(args.config, metrics_at) if metrics_at is not None else None
    try:
        source = await open_source(config.source) if mode != "rate" else None
    except BaseException:
        if metrics is not None:
            await metrics.aclose()
        raise

    started = time.monotonic()
    interrupted = cut = False  # a stop signal came; in-flight work was cancelled
    second = False
    pipeline: Pipeline | None = None
    exit_code = EXIT_OK
    written = 0
    quiet_end = False

    def count_written(n: int) -> None:
        nonlocal written
        written += n

    async def watch_signals(run_scope: anyio.CancelScope) -> None:
        nonlocal interrupted, second
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                if interrupted or pipeline is None:
                    if not interrupted:
                        log.warning(
                            "%s while the engines start: stopping them", signal.Signals(signum).name
                        )
                    if interrupted:
                        second = True
                        log.warning(
                            "second %s: cancelling requests in flight", signal.Signals(signum).name
                        )
                    interrupted = True
                    run_scope.cancel()
                    return
                interrupted = True
                log.warning(
                    "%s: no new prompts or requests; finishing the requests in flight (up to "
                    "%gs, [pipeline] drain_timeout; again to stop at once)",
                    signal.Signals(signum).name,
                    config.pipeline.drain_timeout,
                )
                pipeline.stop()
                run_scope.deadline = anyio.current_time() + config.pipeline.drain_timeout

    try:
        try:
            async with anyio.create_task_group() as tg:
                with anyio.CancelScope() as run_scope:
                    tg.start_soon(watch_signals, run_scope)
                    async with (
                        metrics if metrics is not None else contextlib.nullcontext(),
                        Pipeline(
                            config,
                            skip_ids=skip,
                            limit=getattr(args, "limit", None),
                            failures_path=failures_path,
                            spool_path=spool,
                            mode=mode,
                            shard=getattr(args, "shard", None),
                            engine_log_dir=None if out == "-" else f"{out}.logs",
                        ) as pipeline,
                        NdjsonWriter(out) as writer,
                    ):
                        if metrics is not None:
                            metrics.watch(pipeline)
                        records = pipeline.run(source)
                        if args.progress:
                            total = Total()
                            if mode != "rate":
                                tg.start_soon(
                                    partial(
                                        total.count,
                                        config.source,
                                        limit=getattr(args, "limit", None),
                                        shard=getattr(args, "shard", None),
                                    )
                                )
                            tg.start_soon(
                                partial(
                                    show_progress,
                                    pipeline,
                                    total=total,
                                    interval=args.progress_every,
                                )
                            )
                        await drain(records, writer, on_write=count_written)
                cut = run_scope.cancelled_caught
                if cut and not second and pipeline is not None:
                    log.warning(
                        "the drain timeout (%gs) ran out: cancelled the requests in flight",
                        config.pipeline.drain_timeout,
                    )
                tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise unwrap_group(group) from None
    except (EngineUnavailable, JudgeUnavailable, PoolUnavailable) as exc:
        log.error("%s", exc)
        exit_code = EXIT_USAGE  # an engine that cannot start, a judge or pool at a dead end
    except FileBusy:
        raise
    except SinkError as exc:
        if out == "-" and exc.reader_gone:
            # `run ... | head -1`: the reader took what it wanted; a rerun makes the rest
            _silence_stdout()
            log.debug("%s", exc)
            quiet_end = True
        else:
            log.error("%s", exc)
            exit_code = EXIT_FAILURES
    except StreamFeedbackError as exc:
        if isinstance(exc, (ConfigError, SourceError)):
            raise
        log.error("%s", exc)
        exit_code = EXIT_FAILURES
    if pipeline is not None:
        _summary(
            pipeline,
            config,
            out,
            failures_path,
            time.monotonic() - started,
            written,
            level=logging.DEBUG if quiet_end else logging.INFO,
        )
        stats = pipeline.statistics()
        if exit_code == EXIT_OK and stats.failures:
            exit_code = EXIT_FAILURES
    # A stop that came after the source was all taken, and let everything finish, interrupted
    # nothing: the run is complete and says so.
    complete = (
        pipeline is not None
        and pipeline.mode != "rate"  # its in-flight count knows no total to finish
        and pipeline.source_done
        and not cut
        and pipeline.statistics().in_flight == 0
    )
    if interrupted and not complete:
        if exit_code == EXIT_OK:
            exit_code = EXIT_INTERRUPTED
        if pipeline is not None:
            _unfinished(pipeline, out)
        if out == "-":
            log.warning("records went to stdout: to resume an interrupted run, write with -o FILE")
    return exit_code


def _unfinished(pipeline: Pipeline, out: str) -> None:
    """After a stop: what is left undone, and that the same command picks it up."""
    s = pipeline.statistics()
    left = max(0, s.in_flight)
    rest = "" if pipeline.source_done else " and the prompts of the source not read yet"
    again = "the same command resumes them" if out != "-" else "they are not done"
    kept = ""
    if pipeline.spool is not None and pipeline.mode != "rate":
        kept = f"; finished generations are kept in {pipeline.spool.path}"
    log.warning("stopped: %d prompts unfinished%s; %s%s", left, rest, again, kept)


def _summary(
    pipeline: Pipeline,
    config: Config,
    out: str,
    failures: str,
    wall: float,
    written: int,
    *,
    level: int = logging.INFO,
) -> None:
    """The end-of-run summary on stderr: done, skipped, failed, tokens, judge use and cost.

    Records count what reached the output: a record taken from the pipeline but not written
    (the reader went away) is counted apart, and will be made again by a rerun."""
    s = pipeline.statistics()
    judge = ""
    stats = getattr(pipeline.judge_engine, "statistics", None)
    if stats is not None:
        usage = stats()
        prompt_tokens = getattr(usage, "prompt_tokens", 0)
        completion_tokens = getattr(usage, "completion_tokens", 0)
        judge = f", {prompt_tokens} prompt + {completion_tokens} completion tokens"
        cost = judge_cost(config.rater, prompt_tokens, completion_tokens)
        if cost is not None:
            judge += f", est. cost ${cost:.2f}"
    done = (
        f"{s.spooled} prompts spooled"
        if pipeline.mode == "generate"
        else f"{written} records ({written / wall if wall > 0 else 0.0:.1f}/s)"
        + (f", {s.records - written} not written" if s.records > written else "")
    )
    parts = [
        f"done in {wall:.1f}s: {done}",
        f"{s.skipped} skipped (already done)",
        f"{s.failures} failed" + (f" (see {failures})" if s.failures else ""),
    ]
    if s.from_spool:
        parts.insert(2, f"{s.from_spool} generated before (rated from the spool)")
    if s.duplicates:
        parts.append(f"{s.duplicates} duplicate ids dropped")
    for name, times in pipeline.pool.cooldowns().items():
        parts.append(f"{name} was taken out of routing {times} time(s) for failing")
    if pipeline.mode != "rate":
        parts.append(f"{s.generation_tokens} tokens generated")
    if pipeline.spool is not None and pipeline.mode == "run":
        parts.append(f"{s.spooled} spooled to {pipeline.spool.path}")
    if pipeline.mode != "generate":
        parts.append(
            f"judge: {s.judge_requests} requests ({s.judge_reasks} re-asks), "
            f"{s.null_ratings} null ratings"
            + (f", {s.not_applicable} N/A" if s.not_applicable else "")
            + judge
        )
    log.log(level, "%s", "; ".join(parts))
