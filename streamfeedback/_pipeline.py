"""The pipeline: creates every channel, wires the stages, owns every task.

    source -> intake -> routing -> generation (one worker pool per engine) -> gather (join table)
           [-> spool file -> spool reader] -> rating (judge worker pool) -> records
    intake, gather, rating -> failures -> failures file

Every channel is a bounded `_channels` channel created here and nowhere else; each stage
closes what it was handed, so the end of the source ripples down as end-of-stream and a
slow judge back-pressures the source instead of filling memory.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import AsyncIterable, AsyncIterator, Collection, Iterable, Mapping
from functools import partial
from types import TracebackType
from typing import Any, Literal

import anyio
import anyio.to_thread
import msgspec
from anyio.abc import TaskGroup

from ._channels import Receiver, Sender, open_channel
from ._config import Config, check_config, check_environment
from ._exceptions import EngineUnavailable, SourceError
from ._files import hold
from ._gauges import SECONDS_BUCKETS
from ._groups import unwrap_group
from ._idset import IdSet
from ._judge.judge import Judge
from ._pool import Pool
from ._pricing import judge_cost
from ._records import (
    ChatRequest,
    Completion,
    Failure,
    Generation,
    GenerationJob,
    Joined,
    Prompt,
    Record,
    stable_id,
)
from ._stages import gather, generation, rating, routing
from ._stages.sink import NdjsonWriter, drain
from ._stages.source import SourceProblem, open_source
from ._stages.spool import Spool, scan_spool
from .engines import Engine, make_engine

__all__ = [
    "Mode",
    "ModelStatistics",
    "Pipeline",
    "PipelineStatistics",
    "RecordStream",
    "unwrap_group",
]

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

log = logging.getLogger("streamfeedback")

PromptInput = Prompt | SourceProblem | str | Mapping[str, Any]
Mode = Literal["run", "generate", "rate"]


class ModelStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """One generator's requests. `seconds_buckets[i]` counts answers that took at most
    `seconds_bounds[i]` seconds (and more than the bound before); the last, longer ones."""

    in_flight: int
    requests: int
    failures: int
    tokens: int
    seconds_sum: float
    seconds_bounds: tuple[float, ...] = SECONDS_BUCKETS
    seconds_buckets: tuple[int, ...] = ()


class PipelineStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of a run: what came in, what went out, what is in flight.

    The Prometheus endpoint (`streamfeedback.metrics`) serves exactly these figures."""

    read: int
    skipped: int
    duplicates: int
    records: int
    failures: int
    in_flight: int
    spooled: int
    generation_tokens: int
    judge_requests: int
    judge_reasks: int
    null_ratings: int
    judge_rate_limited: int = 0
    judge_prompt_tokens: int = 0
    judge_completion_tokens: int = 0
    judge_cost_dollars: float | None = None
    """None when the judge's price is unknown (see `[rater] input_cost_per_mtok`)."""
    spool_backlog: int = 0
    """Spool lines (a response each) the judge's reader has not taken yet."""
    models: dict[str, ModelStatistics] = {}


class RecordStream:
    """The records of a run, as they are ready. Iterate it with `async for`."""

    def __init__(self, stream: Receiver[Record], owner: Pipeline) -> None:
        self._stream = stream
        self._owner = owner

    def __aiter__(self) -> RecordStream:
        return self

    async def __anext__(self) -> Record:
        try:
            record = await self._stream.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None
        self._owner._count(record)
        return record

    async def receive(self) -> Record:
        """The next record. :raises anyio.EndOfStream: when the run is complete."""
        record = await self._stream.receive()
        self._owner._count(record)
        return record

    def receive_nowait(self) -> Record:
        """A record already waiting. :raises anyio.WouldBlock: none is."""
        record = self._stream.receive_nowait()
        self._owner._count(record)
        return record

    @property
    def exhausted(self) -> bool:
        stats = self._stream.statistics()
        return stats.open_send_streams == 0 and stats.current_buffer_used == 0


class Pipeline:
    """Streams prompts through the generator pool and the judge; yields `Record`s.

    ```python
    async with Pipeline(load_config("run.toml")) as pipeline:
        async for record in pipeline.run():
            ...
    ```
    Entering starts every engine (in parallel); leaving stops them, also on error or
    cancellation. It runs in the caller's event loop. `engines` and `judge_engine` replace
    the engines the config names (tests, embedding with engines you already hold).

    With a spool (`spool_path`, or `[spool] path`), every response is logged to it as it
    arrives and the judge reads joined prompts from it; prompts already in it are rated, not
    generated again, and those in it in part get only their missing responses.
    `mode="generate"` stops after the spool (no judge); `mode="rate"` rates what a spool
    holds (no generators).
    `skip_ids` are prompts already in the output: neither generated nor rated.
    """

    def __init__(
        self,
        config: Config,
        *,
        engines: Mapping[str, Engine] | None = None,
        judge_engine: Engine | None = None,
        skip_ids: Collection[str] | IdSet = (),
        limit: int | None = None,
        failures_path: str | None = None,
        spool_path: str | None = None,
        mode: Mode = "run",
        shard: tuple[int, int] | None = None,
        batch_state_path: str | None = None,
        engine_log_dir: str | None = None,
    ) -> None:
        check_config(config)
        self.config = config
        self.mode = mode
        self.spool_path = spool_path or config.spool.path
        if mode != "run" and self.spool_path is None:
            raise ValueError(f"mode {mode!r} needs a spool: pass spool_path or set [spool] path")
        self._generator_configs = {g.label: g for g in config.generators}
        self.engines: dict[str, Engine] = {}
        if mode != "rate":
            if engines is None:
                engines = _generator_engines(config, engine_log_dir)
            missing = set(self._generator_configs) - set(engines)
            if missing:
                raise ValueError(f"no engine given for generators {sorted(missing)}")
            self.engines = {name: engines[name] for name in self._generator_configs}
        self.judge_engine: Engine | None = None
        if mode != "generate":
            self.judge_engine = judge_engine or make_engine(
                config.rater.model,
                config.rater,
                role="judge",
                log_dir=engine_log_dir,
                restarts=config.cluster.restarts,
            )
        simulated = config.rater.backend == "sim" or any(
            g.backend == "sim" for g in config.generators
        )
        self.judge = Judge(
            self.judge_engine or _NO_JUDGE,
            config.rater,
            seed=config.routing.seed,
            simulated=simulated,
        )
        if not isinstance(skip_ids, IdSet):
            table = IdSet(len(skip_ids))
            for done in skip_ids:
                table.add(done)
            skip_ids = table
        self.skip_ids = skip_ids
        self.spooled_ids = IdSet()
        self.resumed: dict[str, tuple[tuple[str, ...], frozenset[int]]] = {}
        self.batched_ids = IdSet()
        self.spool: Spool | None = None
        self._spool_entries = 0
        self._spool_lock: int | None = None
        self.limit = limit
        self.shard = shard
        if shard is not None and not 0 <= shard[0] < shard[1]:
            raise ValueError(f"shard {shard[0]}/{shard[1]}: need 0 <= i < n")
        self.failures_path = failures_path or config.output.failures
        self.batch_state_path = batch_state_path or (
            f"{self.spool_path}.batches.json"
            if self.spool_path
            else os.path.join(os.path.dirname(self.failures_path), "streamfeedback.batches.json")
        )
        self._tg: TaskGroup | None = None
        self._intake_scope = anyio.CancelScope()
        self._records: RecordStream | None = None
        self._started_engines: list[Engine] = []
        self._read = self._skipped = self._duplicates = 0
        self._records_out = self._failures_out = 0
        self.pool = Pool(
            self.engines,
            {name: self._generator_configs[name] for name in self.engines},
            cooldown=config.routing.cooldown,
        )
        self.gauges = self.pool.gauges
        self.generation_done = False

    async def __aenter__(self) -> Pipeline:
        check_environment(self.config)
        try:
            return await self._enter()
        except BaseException:
            self._release_spool()
            raise

    async def _enter(self) -> Pipeline:
        if self.spool_path is not None:
            await self._open_spool(self.spool_path)
        if self.mode == "run" and self.config.rater.mode == "batch":
            from ._stages.batch_rating import pending_ids

            # Prompts in batches an earlier run submitted: their batches are resumed, so
            # generating them again would only be thrown away.
            self.batched_ids = await anyio.to_thread.run_sync(pending_ids, self.batch_state_path)
        wanted = [*self.engines.values()]
        if self.judge_engine is not None:
            wanted.append(self.judge_engine)
        try:
            async with anyio.create_task_group() as tg:
                for engine in wanted:
                    tg.start_soon(self._start_engine, engine, name=f"start-{engine.name}")
        except BaseException as exc:
            await self._close_engines()
            raise unwrap_group(exc) from None
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        tg, self._tg = self._tg, None
        try:
            if tg is None:
                return None
            if exc is not None or self._records is None or not self._records.exhausted:
                tg.cancel_scope.cancel()
            try:
                return await tg.__aexit__(exc_type, exc, tb)
            except BaseExceptionGroup as group:
                raise unwrap_group(group) from None
        finally:
            if self._records is not None:
                self._records_rx.close()
            await self._close_engines()
            self._release_spool()

    def _release_spool(self) -> None:
        lock, self._spool_lock = self._spool_lock, None
        if lock is not None:
            os.close(lock)

    async def _open_spool(self, path: str) -> None:
        if self.mode == "rate" and not await anyio.Path(path).exists():
            raise SourceError(path, None, "no such spool file")
        # Held for the whole run: a writer alone, readers (`rate`) together. Only then may a
        # torn last line be cut: it cannot be another run's line in progress.
        reading = self.mode == "rate"
        self._spool_lock = await anyio.to_thread.run_sync(partial(hold, path, shared=reading))
        scan = await anyio.to_thread.run_sync(partial(scan_spool, path, repair=not reading))
        if scan.torn:
            log.warning(
                "%s: cut a torn last line (%d bytes) left by an interrupted run", path, scan.torn
            )
        self.spooled_ids = scan.complete
        # A prompt spooled in part keeps its models, unless one has left the pool since: then
        # it is routed afresh (the old responses stay in the file, unused).
        self.resumed = {
            key: known
            for key, known in scan.partial.items()
            if all(model in self.engines for model in known[0])
        }
        self.spool = Spool(
            path, cache=self.config.spool.cache, done=self.skip_ids, resumed=self.resumed
        )
        self._spool_entries = scan.lines
        if len(scan.complete):
            log.info(
                "spool %s holds %d generated prompts; they will not be generated again",
                path,
                len(scan.complete),
            )
        if scan.partial and reading:
            log.warning(
                "spool %s holds %d prompts generated in part; `run` or `generate` completes them",
                path,
                len(scan.partial),
            )
        elif scan.partial:
            log.info(
                "spool %s holds %d prompts generated in part; only their missing responses "
                "will be asked for",
                path,
                len(scan.partial),
            )

    def run(
        self, prompts: Iterable[PromptInput] | AsyncIterable[PromptInput] | None = None
    ) -> RecordStream:
        """Start the run over `prompts` (default: the config's source); returns its records.

        Records arrive as they are ready, not in source order. Call once per `Pipeline`.
        In `generate` mode the stream ends with no records once everything is spooled.
        """
        if self._tg is None:
            raise RuntimeError("enter the pipeline first: `async with Pipeline(config) as p:`")
        if self._records is not None:
            raise RuntimeError("run() may be called once per Pipeline")
        cfg = self.config
        size = cfg.pipeline.buffer
        tg = self._tg

        records_tx, records_rx = open_channel[Record](size)
        failures_tx, failures_rx = open_channel[Failure](size)
        to_judge_tx, to_judge_rx = open_channel[Joined](size)

        if self.mode != "rate":
            self._start_generation(tg, prompts, to_judge_tx, failures_tx)
        else:
            assert self.spool is not None
            self.spool.finish()
            tg.start_soon(self.spool.read, to_judge_tx, name="spool-reader")

        if self.mode == "generate":
            to_judge_rx.close()
            records_tx.close()
        elif cfg.rater.mode == "batch":
            from ._stages import batch_rating

            tg.start_soon(
                partial(
                    batch_rating.run,
                    self.judge,
                    to_judge_rx,
                    records_tx,
                    failures_tx.clone(),
                    state_path=self.batch_state_path,
                    done=self.skip_ids,
                ),
                name="batch-rating",
            )
        else:
            tg.start_soon(
                partial(
                    rating.run,
                    self.judge,
                    to_judge_rx,
                    records_tx,
                    failures_tx.clone(),
                    concurrency=cfg.rater.concurrency,
                ),
                name="rating",
            )
        failures_tx.close()
        tg.start_soon(self._write_failures, failures_rx, name="failures")
        self._records = RecordStream(records_rx, self)
        self._records_rx = records_rx
        return self._records

    def _start_generation(
        self,
        tg: TaskGroup,
        prompts: Iterable[PromptInput] | AsyncIterable[PromptInput] | None,
        to_judge: Sender[Joined],
        failures: Sender[Failure],
    ) -> None:
        """Intake -> routing -> generation pools -> gather [-> spool], ending at `to_judge`."""
        cfg = self.config
        size = cfg.pipeline.buffer
        prompts_tx, prompts_rx = open_channel[Prompt](size)
        queues_tx: dict[str, Sender[GenerationJob]] = {}
        queues_rx: dict[str, Receiver[GenerationJob]] = {}
        for name in self.engines:
            queues_tx[name], queues_rx[name] = open_channel[GenerationJob](size)
        tg.start_soon(self._intake, prompts, prompts_tx, failures.clone(), name="intake")
        tg.start_soon(
            partial(
                routing.run,
                prompts_rx,
                queues_tx,
                n=cfg.routing.n,
                batch_size=cfg.routing.batch_size,
                seed=cfg.routing.seed,
                available=self.pool.available,
                resumed=self.resumed,
            ),
            name="routing",
        )
        if self.spool is None:
            tg.start_soon(
                partial(self._generate, queues_rx, failures.clone(), joined=to_judge),
                name="generation",
            )
            return
        spool_tx, spool_rx = open_channel[Generation](size)
        tg.start_soon(
            partial(self._generate, queues_rx, failures.clone(), spool=spool_tx),
            name="generation",
        )
        tg.start_soon(self.spool.write, spool_rx, name="spool-writer")
        if self.mode == "generate":
            to_judge.close()
        else:
            tg.start_soon(self.spool.read, to_judge, name="spool-reader")

    async def _generate(
        self,
        queues: Mapping[str, Receiver[GenerationJob]],
        failures: Sender[Failure],
        *,
        joined: Sender[Joined] | None = None,
        spool: Sender[Generation] | None = None,
    ) -> None:
        """Every engine's worker pool, joined by gather (or each response to the spool);
        then free the generators at once (rating may go on for a long time)."""
        cfg = self.config
        async with gather.Gather(
            joined,
            failures,
            spool=spool,
            resumed=self.resumed,
            on_complete=self.pool.forget,
            on_failed=self.spool.drop if self.spool is not None else None,
        ) as join:
            async with anyio.create_task_group() as tg:
                for name, queue in queues.items():
                    gen_config = self._generator_configs[name]
                    tg.start_soon(
                        partial(
                            generation.run,
                            name,
                            self.pool,
                            queue,
                            join,
                            concurrency=gen_config.concurrency * gen_config.replicas,
                            principles=cfg.principles,
                            reroute=cfg.routing.on_generation_failure == "reroute",
                        ),
                        name=f"generation-{name}",
                    )
        engines = list(self.engines.values())
        self._started_engines = [e for e in self._started_engines if e not in engines]
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as tg:
                for engine in engines:
                    tg.start_soon(_close_quietly, engine)
        self.generation_done = True
        if engines:
            log.info("generation complete: %d engines stopped", len(engines))

    def stop_intake(self) -> None:
        """Take no new prompts; everything already in flight finishes and is emitted."""
        self._intake_scope.cancel()

    def statistics(self) -> PipelineStatistics:
        judge = self.judge.statistics()
        usage = getattr(self.judge_engine, "statistics", None)
        engine = usage() if usage is not None else None
        prompt_tokens = getattr(engine, "prompt_tokens", 0)
        completion_tokens = getattr(engine, "completion_tokens", 0)
        spool = self.spool
        return PipelineStatistics(
            read=self._read,
            skipped=self._skipped,
            duplicates=self._duplicates,
            records=self._records_out,
            failures=self._failures_out,
            in_flight=self._read - self._records_out - self._failures_out,
            spooled=self.spool.appended if self.spool is not None else 0,
            generation_tokens=sum(g.tokens for g in self.gauges.values()),
            judge_requests=judge.requests,
            judge_reasks=judge.reasks,
            null_ratings=judge.null_ratings,
            judge_rate_limited=getattr(engine, "rate_limited", 0),
            judge_prompt_tokens=prompt_tokens,
            judge_completion_tokens=completion_tokens,
            judge_cost_dollars=judge_cost(self.config.rater, prompt_tokens, completion_tokens),
            spool_backlog=0
            if spool is None
            else max(
                0,
                self._spool_entries
                + spool.lines_written
                - spool.read_from_file
                - spool.read_from_memory,
            ),
            models={
                name: ModelStatistics(
                    in_flight=g.in_flight,
                    requests=g.done + g.failed,
                    failures=g.failed,
                    tokens=g.tokens,
                    seconds_sum=g.seconds_sum,
                    seconds_buckets=tuple(g.seconds_buckets),
                )
                for name, g in self.gauges.items()
            },
        )

    def _count(self, record: Record) -> None:
        self._records_out += 1

    def _count_failures(self, n: int) -> None:
        self._failures_out += n

    async def _start_engine(self, engine: Engine) -> None:
        self._started_engines.append(engine)
        await engine.start()

    async def _close_engines(self) -> None:
        engines, self._started_engines = self._started_engines, []
        with (
            anyio.CancelScope(shield=True),
            anyio.move_on_after(max(5.0, self.config.pipeline.drain_timeout)),
        ):
            async with anyio.create_task_group() as tg:
                for engine in engines:
                    tg.start_soon(_close_quietly, engine)

    async def _intake(
        self,
        prompts: Iterable[PromptInput] | AsyncIterable[PromptInput] | None,
        out: Sender[Prompt],
        failures: Sender[Failure],
    ) -> None:
        seen = IdSet()
        ordinal = taken = 0
        async with out, failures:
            with self._intake_scope:
                items = await self._open(prompts)
                try:
                    async for item in items:
                        # Not per item (that was a third of the intake's cost): stop_intake
                        # is seen at once; a cancelled run, and the rest of the loop, get a
                        # turn every 64 items, however many of them are skipped.
                        taken += 1
                        if self._intake_scope.cancel_called:
                            await anyio.lowlevel.checkpoint_if_cancelled()
                        elif not taken % 64:
                            await anyio.lowlevel.checkpoint()
                        if isinstance(item, SourceProblem):
                            where = f"{item.path}:{item.line}" if item.line else item.path
                            log.warning("skipping bad input at %s: %s", where, item.error)
                            await failures.send(
                                Failure(
                                    id=item.id or where,
                                    stage="source",
                                    error=item.error,
                                    line=item.line,
                                )
                            )
                            continue
                        if not seen.add(item.id):
                            self._duplicates += 1
                            log.warning(
                                "duplicate prompt id %r%s: kept the first",
                                item.id,
                                f" (line {item.line})" if item.line else "",
                            )
                            continue
                        ordinal += 1
                        if self.limit is not None and ordinal > self.limit:
                            break
                        if (
                            self.shard is not None
                            and (ordinal - 1) % self.shard[1] != self.shard[0]
                        ):
                            continue
                        if (
                            item.id in self.skip_ids
                            or item.id in self.spooled_ids
                            or item.id in self.batched_ids
                        ):
                            self._skipped += 1
                            continue
                        prompt = msgspec.structs.replace(item, index=ordinal)
                        try:
                            out.send_nowait(prompt)
                        except anyio.WouldBlock:
                            # Shielded: a prompt taken from the source is handed on whole, so
                            # stop_intake never loses one; if the run is torn down instead, the
                            # receiver closes and the send ends with BrokenResourceError.
                            with anyio.CancelScope(shield=True):
                                try:
                                    await out.send(prompt)
                                except anyio.BrokenResourceError:
                                    return
                        except anyio.BrokenResourceError:
                            return
                        self._read += 1
                finally:
                    closer = getattr(items, "aclose", None)
                    if closer is not None:
                        with anyio.CancelScope(shield=True):
                            await closer()
            if self._intake_scope.cancelled_caught:
                log.warning("intake stopped: no new prompts; finishing those in flight")

    async def _open(
        self, prompts: Iterable[PromptInput] | AsyncIterable[PromptInput] | None
    ) -> AsyncIterator[Prompt | SourceProblem]:
        if prompts is None:
            return await open_source(self.config.source)
        return _normalize(prompts, self.config.source.column, self.config.source.id_column)

    async def _write_failures(self, failures: Receiver[Failure]) -> None:
        writer = NdjsonWriter(self.failures_path)
        try:
            async with failures:
                await drain(failures, writer, on_write=self._count_failures)
        finally:
            with anyio.CancelScope(shield=True):
                await writer.aclose()


def _generator_engines(config: Config, log_dir: str | None = None) -> dict[str, Engine]:
    """The pool's engines: local workers, or Ray actors when `[cluster] backend = "ray"`.
    A dead local vLLM worker is replaced up to `[cluster] restarts` times, like a replica."""
    if config.cluster.backend == "ray":
        from .engines._ray import RayEngine

        return {g.label: RayEngine(g.label, g, config.cluster) for g in config.generators}
    restarts = config.cluster.restarts
    return {
        g.label: make_engine(g.label, g, log_dir=log_dir, restarts=restarts)
        for g in config.generators
    }


async def _normalize(
    prompts: Iterable[PromptInput] | AsyncIterable[PromptInput],
    column: str,
    id_column: str | None,
) -> AsyncIterator[Prompt | SourceProblem]:
    """Turn the caller's prompts (Prompt, str or mapping) into `Prompt`s."""
    line = 0

    async def items() -> AsyncIterator[PromptInput]:
        if isinstance(prompts, AsyncIterable):
            async for item in prompts:
                yield item
        else:
            for item in prompts:
                yield item

    async for item in items():
        line += 1
        if isinstance(item, (Prompt, SourceProblem)):
            yield item
            continue
        if isinstance(item, str):
            text, pid = item, None
        else:
            raw = item.get(column)
            if not isinstance(raw, str):
                yield SourceProblem(path="<prompts>", line=line, error=f"no text in {column!r}")
                continue
            text = raw
            pid = None if id_column is None or item.get(id_column) is None else str(item[id_column])
        if not text.strip():
            yield SourceProblem(path="<prompts>", line=line, error="empty prompt", id=pid)
            continue
        yield Prompt(id=pid or stable_id(text), instruction=text, line=line)


class _NoJudge:
    """The judge engine of a generate-only run: never asked."""

    name = "no-judge"

    async def start(self) -> None:
        pass

    async def generate(self, request: ChatRequest) -> Completion:
        raise EngineUnavailable(self.name, "this run does not rate (mode 'generate')")

    async def aclose(self) -> None:
        pass


_NO_JUDGE = _NoJudge()


async def _close_quietly(engine: Engine) -> None:
    try:
        await engine.aclose()
    except Exception as exc:  # a failing close must not hide the run's own outcome
        log.warning("closing %s failed: %s", engine.name, exc)
