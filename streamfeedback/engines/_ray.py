"""Generators as Ray actors: one model served by `replicas` actors anywhere in a Ray cluster.

`RayEngine` is an ordinary `Engine` on the driver, so the asyncio pipeline (continuous
dispatch, in-flight bounds, failure policy) does not change. Each replica is a `_EngineActor`
in its own Ray worker process; it builds the inner engine the config names (`make_engine`:
sim, openai or vllm) and serves it. Requests and answers cross as msgspec bytes, so nothing
depends on pickling our Structs, and inner `EngineError`s come back as the same subclass.

GPUs: a replica asks Ray for `max(1, len(gpu_ids))` GPUs under vllm (its tensor-parallel
size) and `len(gpu_ids)` otherwise, so `gpu = 0` on a sim generator reserves one logical GPU
(the tests use this to check placement). Which GPUs is Ray's choice: inside the actor the
inner vLLM config's `gpus` are replaced by `ray.get_gpu_ids()`, the physical ids Ray gave the
actor; VLLMEngine puts exactly those in its worker's CUDA_VISIBLE_DEVICES, which is what Ray
set for the actor itself.

Dispatch: each request goes to the live replica with the fewest requests in flight (ties
round robin), at most `config.concurrency` per replica. A replica whose actor, worker or node
dies (or whose inner engine reports EngineUnavailable) is marked dead, logged once, and its
requests fail over to the other replicas; `EngineUnavailable` is raised only when none is
left. Ray notices a dead node by its health checks (seconds to tens of seconds, per the
cluster's settings); a killed actor's vLLM worker sees its stdin close and exits, freeing the
GPU. `concurrency` is the whole engine's bound (`config.concurrency` x `replicas`): the
pipeline should run that many generation workers for it.

Restarts: a dead replica is replaced by a new actor (placed wherever Ray finds its GPUs, so a
lost node's replicas come back on the nodes left, capacity permitting), up to `[cluster]
restarts` times per replica, with a growing pause between tries; it takes requests again once
its engine has started. Ray's own `max_restarts` stays 0: a restarted actor must also start
its inner engine, which only our start call does. The restarts run in a task group the engine
owns (`_tasks.TaskHost`, as `start` and `aclose` may run in different tasks); `aclose` cancels
and awaits it before killing the actors. If the supervisor crashes (a bug), that is logged at
once and every later call raises `EngineUnavailable` naming the crash.

Connection: the first RayEngine to start calls `ray.init` (in a thread, so Ray neither blocks
the event loop nor takes over SIGTERM from the pipeline) unless the process is already
connected; the last one to close calls `ray.shutdown`, which stops a local cluster started
that way and only disconnects from a cluster given by `address`. A connection the caller made
is never shut down. Worker logs stay in Ray's session folder (`log_to_driver = False`):
stdout carries records only.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import threading
from typing import Any, NoReturn

import anyio
import msgspec

from .._channels import Receiver, Sender, open_channel
from .._config import ClusterConfig, GeneratorConfig
from .._exceptions import (
    EngineBusy,
    EngineError,
    EngineRequestError,
    EngineTimeout,
    EngineUnavailable,
)
from .._records import ChatRequest, Completion
from ._tasks import TaskHost

__all__ = ["RayEngine", "RayStatistics", "ReplicaStatistics"]

log = logging.getLogger("streamfeedback.ray")

SHUTDOWN_GRACE_S = 30.0
"""How long `aclose` waits for the replicas to close their inner engines before killing them."""
TIMEOUT_MARGIN_S = 30.0
"""Added to `config.timeout` on the driver: the inner engine's own timeout should fire first."""
ACTOR_EXTRA_CONCURRENCY = 4
"""Actor calls beyond the request bound, so a full replica still answers `shutdown`."""
CONNECT_TIMEOUT_S = 10.0
"""How long to try reaching the cluster's address before `ray.init`."""
OBJECT_STORE_BYTES = 200 * 1024 * 1024
"""Object store of a local cluster that `ray.init` starts: answers are small and inline."""
RESTART_PAUSE_S = 1.0
"""Pause before a replica's first restart; doubled for each further try."""

_ERRORS: dict[str, type[EngineError]] = {
    cls.__name__: cls
    for cls in (EngineError, EngineTimeout, EngineBusy, EngineRequestError, EngineUnavailable)
}


# -- what crosses the actor boundary ------------------------------------------------------


class _Done(msgspec.Struct, tag="done", frozen=True, kw_only=True):
    completion: Completion


class _Failed(msgspec.Struct, tag="failed", frozen=True, kw_only=True):
    kind: str
    message: str
    status: int | None = None
    retry_after: float | None = None


class _Started(msgspec.Struct, frozen=True, kw_only=True):
    pid: int
    node_id: str
    gpu_ids: list[str]
    cuda_visible_devices: str | None
    error: str | None = None


_answer_decoder = msgspec.msgpack.Decoder(_Done | _Failed)
_started_decoder = msgspec.msgpack.Decoder(_Started)
_request_decoder = msgspec.msgpack.Decoder(ChatRequest)
_config_decoder = msgspec.msgpack.Decoder(GeneratorConfig)
_encoder = msgspec.msgpack.Encoder()


def _failed(exc: EngineError) -> _Failed:
    prefix = f"{exc.engine}: "
    text = str(exc)
    return _Failed(
        kind=type(exc).__name__ if type(exc).__name__ in _ERRORS else "EngineError",
        message=text[len(prefix) :] if text.startswith(prefix) else text,
        status=exc.status,
        retry_after=getattr(exc, "retry_after", None),
    )


class _EngineActor:
    """One replica, in a Ray worker process: the inner engine, served in msgpack bytes."""

    def __init__(self, name: str, config: bytes) -> None:
        from . import make_engine

        self._name = name
        self._config = _config_decoder.decode(config)
        self._make_engine = make_engine
        self._engine: Any = None

    async def start(self) -> bytes:
        """Build and start the inner engine; failures are answered as data, not raised."""
        import ray

        gpu_ids = [str(gpu) for gpu in ray.get_gpu_ids()]
        started = _Started(
            pid=os.getpid(),
            node_id=ray.get_runtime_context().get_node_id(),
            gpu_ids=gpu_ids,
            cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
        )
        try:
            if self._engine is None:
                config = self._config
                if config.backend == "vllm":
                    # VLLMEngine sets its worker's CUDA_VISIBLE_DEVICES from `gpus`: hand it
                    # the physical ids Ray assigned, never the ones in the driver's config.
                    if not all(gpu.isdigit() for gpu in gpu_ids):
                        raise EngineUnavailable(
                            self._name, f"Ray assigned GPUs {gpu_ids}: expected integer ids"
                        )
                    config = msgspec.structs.replace(
                        config, gpus=[int(gpu) for gpu in gpu_ids], gpu=None
                    )
                self._engine = self._make_engine(self._name, config)
            await self._engine.start()
        except EngineError as exc:
            started = msgspec.structs.replace(started, error=_failed(exc).message)
        return _encoder.encode(started)

    async def generate(self, request: bytes) -> bytes:
        """One chat; an `EngineError` comes back as a `_Failed` answer."""
        try:
            completion = await self._engine.generate(_request_decoder.decode(request))
        except EngineError as exc:
            return _encoder.encode(_failed(exc))
        return _encoder.encode(_Done(completion=completion))

    async def shutdown(self) -> None:
        """Close the inner engine (a vLLM worker must not outlive its actor)."""
        if self._engine is not None:
            await self._engine.aclose()


# -- one driver connection for every RayEngine ---------------------------------------------

_connection_lock = threading.Lock()
_connection_users = 0  # RayEngines holding the connection that `_connect` opened
_ray_module: Any = None
_actor_class: Any = None


def _connect(cluster: ClusterConfig) -> bool:
    """Import Ray and connect once per process; True if the caller now holds a reference.

    Runs in a worker thread; the lock makes concurrent starts open one connection.
    """
    global _connection_users, _ray_module, _actor_class
    with _connection_lock:
        import ray

        _ray_module = ray
        if _actor_class is None:
            _actor_class = ray.remote(_EngineActor)
        if ray.is_initialized():
            if _connection_users == 0:
                return False  # the caller's own connection: theirs to shut down
            _connection_users += 1
            return True
        options: dict[str, Any] = {
            "address": cluster.address,
            "namespace": cluster.namespace,
            "log_to_driver": False,
            "configure_logging": False,
        }
        _quiet_thread_warning()
        if cluster.address is None:
            try:  # a new local cluster: keep it small
                ray.init(**options, include_dashboard=False, object_store_memory=OBJECT_STORE_BYTES)
            except ValueError as exc:
                if "existing cluster" not in str(exc):
                    raise
                ray.init(**options)  # Ray found one started by `ray start` on this machine
        else:
            _check_reachable(cluster.address)
            ray.init(**options)
        _connection_users = 1
        return True


def _check_reachable(address: str) -> None:
    """Fail fast on a `host:port` nobody listens on: `ray.init` would retry for minutes.

    :raises ConnectionError: naming the address.
    """
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return  # "auto", "ray://...": Ray resolves and reports these itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise ConnectionError(f"nothing answers at {address} ({exc})") from exc


def _disconnect() -> None:
    global _connection_users
    with _connection_lock:
        _connection_users -= 1
        if _connection_users == 0 and _ray_module is not None:
            _ray_module.shutdown()


class _NoSigtermWarning(logging.Filter):
    """Ray warns that a thread cannot set its SIGTERM handler; we do not want it to."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("SIGTERM handler is not set")


_sigterm_filter = _NoSigtermWarning()


def _quiet_thread_warning() -> None:
    logger = logging.getLogger("ray._private.worker")
    if _sigterm_filter not in logger.filters:
        logger.addFilter(_sigterm_filter)


def _lost_errors(ray: Any) -> tuple[type[BaseException], ...]:
    """Ray's errors that mean the replica (actor, worker process or node) is gone."""
    exc = ray.exceptions
    return (exc.RayActorError, exc.WorkerCrashedError, exc.NodeDiedError, exc.ObjectLostError)


# -- the driver side ------------------------------------------------------------------------


class ReplicaStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """One replica's counters and where Ray put it."""

    index: int
    alive: bool
    node_id: str | None
    gpu_ids: list[str]
    pid: int | None
    requests: int
    failures: int
    in_flight: int
    peak_in_flight: int
    restarts: int = 0


class RayStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of a RayEngine: totals over replicas, then each replica."""

    in_flight: int
    peak_in_flight: int
    requests: int
    failures: int
    failovers: int
    prompt_tokens: int
    completion_tokens: int
    replicas: list[ReplicaStatistics]


class _Replica:
    """The driver's view of one actor: its handle, its bound and its counters."""

    def __init__(self, index: int, actor: Any, concurrency: int) -> None:
        self.index = index
        self.actor = actor
        self.limiter = anyio.CapacityLimiter(concurrency)
        self.started: _Started | None = None
        self.dead: str | None = None
        self.in_flight = 0
        self.peak_in_flight = 0
        self.requests = 0
        self.failures = 0
        self.restarts = 0

    def statistics(self) -> ReplicaStatistics:
        started = self.started
        return ReplicaStatistics(
            index=self.index,
            alive=self.dead is None and started is not None,
            node_id=started.node_id if started else None,
            gpu_ids=list(started.gpu_ids) if started else [],
            pid=started.pid if started else None,
            requests=self.requests,
            failures=self.failures,
            in_flight=self.in_flight,
            peak_in_flight=self.peak_in_flight,
            restarts=self.restarts,
        )


class _ReplicaLost(Exception):
    def __init__(self, reason: str, actor: Any = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.actor = actor  # the actor that was lost: a replica may have a new one by now


class RayEngine:
    """An `Engine` whose model runs as `config.replicas` Ray actors, load-balanced."""

    def __init__(self, name: str, config: GeneratorConfig, cluster: ClusterConfig) -> None:
        self.name = name
        self.config = config
        self.cluster = cluster
        self._replicas: list[_Replica] = []
        self._started = False
        self._closed = False
        self._holds_connection = False
        self._start_lock = anyio.Lock()
        self._limiter = anyio.CapacityLimiter(config.concurrency * config.replicas)
        self._turn = itertools.count()
        self._in_flight = 0
        self._peak_in_flight = 0
        self._requests = 0
        self._failures = 0
        self._failovers = 0
        self._prompt_tokens = 0
        self._completion_tokens = 0
        self._options: dict[str, Any] = {}
        self._config_bytes = b""
        self._restarts: Sender[_Replica] | None = None
        self._supervisor = TaskHost(f"{name}: restart supervisor")

    # -- public -------------------------------------------------------------------------

    @property
    def num_gpus(self) -> int:
        """GPUs each replica asks Ray for: the tensor-parallel size under vllm."""
        if self.config.backend == "vllm":
            return max(1, len(self.config.gpu_ids))
        return len(self.config.gpu_ids)

    @property
    def concurrency(self) -> int:
        """Requests this engine takes in flight: `config.concurrency` per replica."""
        return self.config.concurrency * self.config.replicas

    def statistics(self) -> RayStatistics:
        return RayStatistics(
            in_flight=self._in_flight,
            peak_in_flight=self._peak_in_flight,
            requests=self._requests,
            failures=self._failures,
            failovers=self._failovers,
            prompt_tokens=self._prompt_tokens,
            completion_tokens=self._completion_tokens,
            replicas=[replica.statistics() for replica in self._replicas],
        )

    async def start(self) -> None:
        """Connect to Ray, create the replicas and wait until each inner engine is started.

        :raises EngineUnavailable: Ray is missing or unreachable, or a replica cannot start
            (placed nowhere within `config.timeout` seconds, or its engine failed); the
            message names the model and the replica.
        """
        async with self._start_lock:
            self._check_open()
            if self._started:
                return
            try:
                await self._start()
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await self._teardown()
                raise
            if self._closed:
                raise self._unavailable("the engine was closed while starting")
            self._started = True

    async def generate(self, request: ChatRequest) -> Completion:
        """Answer on the least busy live replica; fail over if that replica dies meanwhile.

        :raises EngineUnavailable: not started, closed, or every replica is dead.
        :raises EngineTimeout: no answer within `config.timeout` (+ a margin) seconds.
        :raises EngineError: the inner engine's error, as the same subclass.
        """
        self._check_usable()
        payload = _encoder.encode(request)
        async with self._limiter:
            self._in_flight += 1
            self._peak_in_flight = max(self._peak_in_flight, self._in_flight)
            try:
                return await self._dispatch(payload)
            except EngineError:
                self._failures += 1
                raise
            finally:
                self._in_flight -= 1

    async def aclose(self) -> None:
        """Stop restarts, close each live replica's engine (bounded), kill every actor, drop
        the connection.

        Safe to call twice, after a failed start, and while the caller is being cancelled.
        """
        self._closed = True
        with anyio.CancelScope(shield=True):
            await self._stop_restarts()
            await self._teardown()

    # -- start and stop -----------------------------------------------------------------

    async def _start(self) -> None:
        try:
            self._holds_connection = await anyio.to_thread.run_sync(_connect, self.cluster)
        except ImportError as exc:
            raise self._unavailable(
                f"Ray is not installed ({exc}): pip install 'streamfeedback[ray]'"
            ) from exc
        except Exception as exc:
            where = self.cluster.address or "a new local cluster"
            raise self._unavailable(f"cannot connect to Ray at {where}: {exc}") from exc
        self._replicas = []
        self._config_bytes = _encoder.encode(self.config)
        self._options = {
            "num_gpus": self.num_gpus,
            "num_cpus": 1 if self.config.backend == "vllm" else 0,
            "max_concurrency": self.config.concurrency + ACTOR_EXTRA_CONCURRENCY,
            "max_restarts": 0,
        }
        for i in range(self.config.replicas):
            self._replicas.append(_Replica(i, self._new_actor(), self.config.concurrency))
        failures: list[EngineUnavailable] = []
        async with anyio.create_task_group() as tg:
            for replica in self._replicas:
                tg.start_soon(self._start_replica, replica, failures, tg.cancel_scope)
        if failures:
            raise failures[0]
        if self.cluster.restarts > 0 and not self._closed:
            self._restarts, inbox = open_channel[_Replica](len(self._replicas))
            await self._supervisor.open()
            self._supervisor.start_soon(self._supervise, inbox, name=f"supervise-{self.name}")

    def _new_actor(self) -> Any:
        return _actor_class.options(**self._options).remote(self.name, self._config_bytes)

    # -- restarts -----------------------------------------------------------------------

    async def _supervise(self, inbox: Receiver[_Replica]) -> None:
        """Restart each replica reported dead, each in its own child task."""
        async with inbox, anyio.create_task_group() as tg:
            async for replica in inbox:
                tg.start_soon(self._restart, replica, name=f"restart-{self.name}-{replica.index}")

    async def _restart(self, replica: _Replica) -> None:
        """Replace a dead replica's actor until one starts or its restarts are used up."""
        pause = RESTART_PAUSE_S
        while replica.restarts < self.cluster.restarts and not self._closed:
            await anyio.sleep(pause)
            pause *= 2
            replica.restarts += 1
            log.warning(
                "%s: restarting replica %d (try %d of %d)",
                self.name,
                replica.index,
                replica.restarts,
                self.cluster.restarts,
            )
            old, replica.actor = replica.actor, None
            if old is not None:
                with contextlib.suppress(Exception):
                    _ray_module.kill(old, no_restart=True)
            try:
                replica.actor = self._new_actor()
                await self._start_one(replica)
            except Exception as exc:  # whatever went wrong, this try is over; kill its actor
                failed, replica.actor = replica.actor, None
                if failed is not None:
                    with contextlib.suppress(Exception):
                        _ray_module.kill(failed, no_restart=True)
                log.warning("%s: replica %d did not come back: %s", self.name, replica.index, exc)
                continue
            replica.dead = None
            live = sum(r.dead is None for r in self._replicas)
            self._limiter.total_tokens = live * self.config.concurrency
            log.warning(
                "%s: replica %d is back (pid %s, node %s); %d of %d live",
                self.name,
                replica.index,
                replica.started.pid if replica.started else "?",
                replica.started.node_id if replica.started else "?",
                live,
                len(self._replicas),
            )
            return
        if not self._closed:
            log.error(
                "%s: replica %d stays dead after %d restarts",
                self.name,
                replica.index,
                replica.restarts,
            )

    async def _stop_restarts(self) -> None:
        restarts, self._restarts = self._restarts, None
        if restarts is not None:
            restarts.close()
        await self._supervisor.aclose()

    async def _start_replica(
        self, replica: _Replica, failures: list[EngineUnavailable], scope: anyio.CancelScope
    ) -> None:
        """Start one replica; the first failure is kept and cancels the other starts."""
        try:
            await self._start_one(replica)
        except EngineUnavailable as exc:
            failures.append(exc)
            scope.cancel()

    async def _start_one(self, replica: _Replica) -> None:
        ray = _ray_module
        ref = replica.actor.start.remote()
        try:
            with anyio.fail_after(self.config.timeout):
                data = await ref
        except TimeoutError:
            raise self._unavailable(
                f"replica {replica.index} was not placed and started within "
                f"{self.config.timeout:g} s (it needs {self.num_gpus} GPU(s) on one node)"
            ) from None
        except ray.exceptions.RayError as exc:
            raise self._unavailable(f"replica {replica.index} failed to start: {exc}") from exc
        started: _Started = _started_decoder.decode(data)
        replica.started = started
        if started.error is not None:
            raise self._unavailable(f"replica {replica.index}: {started.error}")
        log.debug(
            "%s: replica %d started (pid %d, node %s, GPUs %s)",
            self.name,
            replica.index,
            started.pid,
            started.node_id,
            started.gpu_ids,
        )

    async def _teardown(self) -> None:
        """Shutdown call to each live actor, then `ray.kill` for all; then disconnect."""
        replicas = [r for r in self._replicas if r.actor is not None]
        if replicas:
            with anyio.move_on_after(SHUTDOWN_GRACE_S):
                async with anyio.create_task_group() as tg:
                    for replica in replicas:
                        if replica.dead is None and replica.started is not None:
                            tg.start_soon(self._shutdown_replica, replica)
            for replica in replicas:
                self._kill(replica)
        if self._holds_connection:
            self._holds_connection = False
            await anyio.to_thread.run_sync(_disconnect)

    async def _shutdown_replica(self, replica: _Replica) -> None:
        with contextlib.suppress(Exception):
            await replica.actor.shutdown.remote()

    def _kill(self, replica: _Replica) -> None:
        actor, replica.actor = replica.actor, None
        if replica.dead is None:
            replica.dead = "the engine was closed"
        if actor is not None:
            with contextlib.suppress(Exception):
                _ray_module.kill(actor, no_restart=True)

    # -- dispatch and failover ----------------------------------------------------------

    async def _dispatch(self, payload: bytes) -> Completion:
        tried: set[int] = set()
        while True:
            self._check_usable()
            replica = self._pick(tried)
            if replica is None:
                raise self._unavailable(self._why_none())
            tried.add(replica.index)
            try:
                return await self._ask(replica, payload)
            except _ReplicaLost as lost:
                if lost.actor is None or lost.actor is replica.actor:
                    self._lose(replica, lost.reason)
                self._failovers += 1

    def _pick(self, tried: set[int]) -> _Replica | None:
        """The live, untried replica with the fewest requests in flight; ties round robin."""
        live = [r for r in self._replicas if r.dead is None and r.index not in tried]
        if not live:
            return None
        turn = next(self._turn) % len(self._replicas)
        best = min(live, key=lambda r: (r.in_flight, (r.index - turn) % len(self._replicas)))
        best.in_flight += 1  # before any await, so concurrent picks see it
        best.peak_in_flight = max(best.peak_in_flight, best.in_flight)
        return best

    async def _ask(self, replica: _Replica, payload: bytes) -> Completion:
        ray = _ray_module
        actor = None
        try:
            async with replica.limiter:
                actor = replica.actor
                if replica.dead is not None or actor is None:
                    raise _ReplicaLost(replica.dead or "the replica is gone")
                ref = actor.generate.remote(payload)
                try:
                    with anyio.fail_after(self.config.timeout + TIMEOUT_MARGIN_S):
                        data = await ref
                except BaseException:
                    with contextlib.suppress(Exception):
                        ray.cancel(ref)
                    raise
        except _lost_errors(ray) as exc:
            raise _ReplicaLost(f"{type(exc).__name__}: {_first_line(exc)}", actor) from exc
        except ray.exceptions.RayError as exc:
            replica.failures += 1
            raise EngineError(
                self.name, f"replica {replica.index}: {_first_line(exc)} ({self._what()})"
            ) from exc
        except TimeoutError:
            replica.failures += 1
            raise EngineTimeout(
                self.name,
                f"no answer from replica {replica.index} in "
                f"{self.config.timeout + TIMEOUT_MARGIN_S:g} s ({self._what()})",
            ) from None
        finally:
            replica.in_flight -= 1
        answer = _answer_decoder.decode(data)
        if isinstance(answer, _Done):
            replica.requests += 1
            self._requests += 1
            self._prompt_tokens += answer.completion.prompt_tokens
            self._completion_tokens += answer.completion.completion_tokens
            return answer.completion
        if answer.kind == "EngineUnavailable" and not self._closed:
            raise _ReplicaLost(answer.message, actor)
        replica.failures += 1
        self._raise(answer)

    def _raise(self, answer: _Failed) -> NoReturn:
        cls = _ERRORS.get(answer.kind, EngineError)
        if cls is EngineBusy:
            raise EngineBusy(
                self.name, answer.message, status=answer.status, retry_after=answer.retry_after
            )
        raise cls(self.name, answer.message, status=answer.status)

    def _lose(self, replica: _Replica, reason: str) -> None:
        """Mark a replica dead (once), warn, and make sure its actor is gone."""
        replica.failures += 1
        if replica.dead is not None:
            return
        replica.dead = reason
        live = sum(r.dead is None for r in self._replicas)
        # Requests beyond what the survivors take wait here, free to go to whichever frees first.
        self._limiter.total_tokens = max(1, live) * self.config.concurrency
        log.warning(
            "%s: replica %d is dead (%s); %d of %d left, its requests fail over",
            self.name,
            replica.index,
            reason,
            live,
            len(self._replicas),
        )
        actor = replica.actor
        if actor is not None:
            with contextlib.suppress(Exception):
                _ray_module.kill(actor, no_restart=True)
        if self._restarts is not None and not self._closed:
            with contextlib.suppress(
                anyio.WouldBlock, anyio.ClosedResourceError, anyio.BrokenResourceError
            ):
                self._restarts.send_nowait(replica)

    # -- errors -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise self._unavailable("the engine was closed")

    def _check_usable(self) -> None:
        self._check_open()
        if not self._started:
            raise self._unavailable("the engine is not started")
        crash = self._supervisor.failure
        if crash is not None:
            raise self._unavailable(f"its restart supervisor failed: {crash!r}") from crash

    def _why_none(self) -> str:
        reasons = "; ".join(f"replica {r.index}: {r.dead}" for r in self._replicas if r.dead)
        return f"no live replica left ({reasons})"

    def _what(self) -> str:
        return f"model {self.config.model!r} on Ray"

    def _unavailable(self, message: str) -> EngineUnavailable:
        return EngineUnavailable(self.name, f"{self._what()}: {message}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
