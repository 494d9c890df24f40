"""The vLLM backend: one `AsyncLLMEngine` per GPU (or GPU group), each in its own process.

vLLM does not support several engines on different GPUs in one process, and a process that
touched CUDA cannot hand a GPU to a sibling; so this parent side never imports vllm. `start`
spawns `_vllm_worker` with `CUDA_VISIBLE_DEVICES` in its environment and waits for it to
report Ready; `generate` sends one Generate frame and awaits its Result. Up to
`config.concurrency` (about 1.1 x max_num_seqs) requests are outstanding per worker: enough
that vLLM's scheduler always has a queue to refill its batch from, few enough that requests
never wait in vLLM longer than about one generation.

Task ownership: the Engine protocol lets `start` and `aclose` run in different tasks (the
pipeline starts every engine inside one task group's children), and an anyio task group must
be exited by the task that entered it. So the service (frame reader and exit watcher) runs in
a task group the engine owns (`engines/_tasks.TaskHost`, as Ray's restart supervisor), opened
once the worker is Ready and closed by `aclose` (or a restart); anything it hits becomes the
engine's EngineUnavailable, delivered to every waiting and later `generate`. Nothing is
fire-and-forget.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec
from anyio.abc import Process

from .._config import EngineConfig
from .._exceptions import EngineError, EngineRequestError, EngineTimeout, EngineUnavailable
from .._records import ChatRequest, Completion
from ._tasks import TaskHost
from ._vllm_worker import (
    MAX_FRAME,
    PARENT_PID_ENV,
    Abort,
    Failed,
    Fatal,
    FromWorker,
    Generate,
    Hello,
    Ready,
    Result,
    Shutdown,
    ToWorker,
    frame,
)

__all__ = ["VLLMEngine", "VLLMStatistics", "engine_args"]

log = logging.getLogger("streamfeedback.vllm")

WORKER_MODULE = "streamfeedback.engines._vllm_worker"
SHUTDOWN_GRACE_S = 10.0
TERMINATE_GRACE_S = 5.0
GROUP_EXIT_S = 3.0
DEFAULT_MAX_NUM_BATCHED_TOKENS = 8192
_ROOT = str(Path(__file__).resolve().parents[2])  # the folder that holds `streamfeedback`


def engine_args(config: EngineConfig) -> dict[str, Any]:
    """AsyncEngineArgs keywords (besides `model`) for this config: only what it sets.

    `max_num_seqs` and `max_num_batched_tokens` are always explicit: `from_engine_args` runs in
    vLLM's ENGINE_CONTEXT, which has no tuned default and falls back to the scheduler's
    small test-sized token budget. 8192 is vLLM's own offline (LLM class) default.
    """
    args: dict[str, Any] = {
        "tensor_parallel_size": max(1, len(config.gpu_ids)),
        "gpu_memory_utilization": config.gpu_memory_utilization,
        "max_num_seqs": config.max_num_seqs,
        "max_num_batched_tokens": config.max_num_batched_tokens or DEFAULT_MAX_NUM_BATCHED_TOKENS,
        "dtype": config.dtype,
    }
    optional = {
        "max_model_len": config.max_model_len,
        "seed": config.seed,
        "download_dir": config.download_dir,
        "quantization": config.quantization,
        "enforce_eager": config.enforce_eager or None,
        "trust_remote_code": config.trust_remote_code or None,
    }
    args.update({key: value for key, value in optional.items() if value is not None})
    return args


class VLLMStatistics(msgspec.Struct, kw_only=True):
    """A snapshot of one engine's counters (a copy: mutating it changes nothing)."""

    in_flight: int
    peak_in_flight: int
    requests: int
    failures: int
    prompt_tokens: int
    completion_tokens: int


class _Slot:
    """One outstanding request: set `done` once its answer (or the engine's death) is in."""

    __slots__ = ("answer", "done")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.answer: Result | Failed | None = None


@functools.cache
def _default_log_dir() -> Path:
    """One temporary folder per process for engine logs, named once on stderr."""
    path = Path(tempfile.mkdtemp(prefix="streamfeedback-engine-logs-"))
    log.info("vLLM engine logs go to %s", path)
    return path


class VLLMEngine:
    """An `Engine` backed by a vLLM worker process on `config.gpu_ids`.

    The worker's own output (vLLM's logging, progress bars, library notices) goes to
    `log_dir/NAME.log`, never to the user's stderr. A worker that dies is replaced up to
    `restarts` times; after that the engine is `gone` and stays out of routing.
    """

    def __init__(
        self,
        name: str,
        config: EngineConfig,
        *,
        log_dir: str | os.PathLike[str] | None = None,
        restarts: int = 0,
    ) -> None:
        self.name = name
        self.config = config
        self.restarts = restarts
        self._log_dir = None if log_dir is None else Path(log_dir)
        self._log_path: Path | None = None
        self._restarts_used = 0
        self._process: Process | None = None
        self._pid: int | None = None
        self._host: TaskHost | None = None
        self._ready: Ready | None = None
        self._closed = False
        self._dead: str | None = None
        self._buffer = bytearray()
        self._decoder = msgspec.msgpack.Decoder(FromWorker)
        self._start_lock = anyio.Lock()
        self._send_lock = anyio.Lock()
        self._limiter = anyio.CapacityLimiter(config.concurrency)
        self._ids = itertools.count(1)
        self._slots: dict[int, _Slot] = {}
        self._in_flight = 0
        self._peak_in_flight = 0
        self._requests = 0
        self._failures = 0
        self._prompt_tokens = 0
        self._completion_tokens = 0

    # -- public -------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The worker's process id (the last one, after `aclose`), once spawned."""
        return self._pid

    @property
    def log_path(self) -> Path | None:
        """The worker's log file, once spawned."""
        return self._log_path

    @property
    def gone(self) -> bool:
        """Dead for good: closed, or died with no restart left. Routing leaves it out."""
        return self._closed or (self._dead is not None and self._restarts_used >= self.restarts)

    @property
    def where(self) -> str:
        """Model and GPU(s), as every error message names them."""
        gpus = self.config.gpu_ids
        place = f"GPU {gpus[0]}" if len(gpus) == 1 else f"GPUs {','.join(map(str, gpus))}"
        return f"model {self.config.model!r} on {place}"

    def statistics(self) -> VLLMStatistics:
        return VLLMStatistics(
            in_flight=self._in_flight,
            peak_in_flight=self._peak_in_flight,
            requests=self._requests,
            failures=self._failures,
            prompt_tokens=self._prompt_tokens,
            completion_tokens=self._completion_tokens,
        )

    async def start(self) -> None:
        """Spawn the worker and wait until its engine is built (weights loaded).

        :raises EngineUnavailable: naming the model, the GPU(s) and the worker's error.
        """
        async with self._start_lock:
            if self._ready is not None:
                self._check_usable()
                return
            self._check_usable()
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                raise EngineUnavailable(self.name, "the vllm backend needs asyncio") from None
            try:
                await self._spawn()
            except BaseException as exc:
                # A worker still loading reads no frames: a Shutdown would only wait out its
                # grace period (Ctrl-C while engines load must stop within seconds).
                await self._kill_worker(graceful=False)
                if isinstance(exc, OSError):
                    raise self._unavailable(f"cannot start the worker: {exc}") from exc
                raise

    async def generate(self, request: ChatRequest) -> Completion:
        """Send one chat to the worker and await its answer; cancelling aborts it there.

        :raises EngineRequestError: the request cannot be served (e.g. the prompt is too long).
        :raises EngineTimeout: no answer within `config.timeout` seconds.
        :raises EngineUnavailable: the worker is not started, closed, or died.
        """
        if self._dead is not None and not self.gone:
            await self._revive()
        self._check_usable()
        async with self._limiter:
            self._check_usable()
            rid = next(self._ids)
            slot = _Slot()
            self._slots[rid] = slot
            self._in_flight += 1
            self._peak_in_flight = max(self._peak_in_flight, self._in_flight)
            try:
                await self._send(Generate(id=rid, request=request))
                with anyio.fail_after(self.config.timeout):
                    await slot.done.wait()
            except TimeoutError:
                self._failures += 1
                await self._abort(rid)
                raise EngineTimeout(
                    self.name, f"no answer in {self.config.timeout:g} s ({self.where})"
                ) from None
            except BaseException:
                if slot.answer is None:
                    await self._abort(rid)
                raise
            finally:
                del self._slots[rid]
                self._in_flight -= 1
        return self._outcome(slot.answer)

    async def aclose(self) -> None:
        """Ask the worker to shut down, then terminate, then kill it: never leave it behind.

        Safe to call twice, after a failed start, and while the caller is being cancelled.
        """
        self._closed = True
        self._die("the engine was closed")
        await self._kill_worker()

    # -- start and stop -----------------------------------------------------------------

    async def _revive(self) -> None:
        """Replace a dead worker (one caller does it; the others wait on the start lock)."""
        async with self._start_lock:
            if self._dead is None or self.gone:
                return
            self._restarts_used += 1
            reason, left = self._dead, self.restarts - self._restarts_used
            log.warning(
                "%s: %s; restarting the worker (%d restart(s) left after this one)",
                self.name,
                reason,
                left,
            )
            await self._kill_worker(graceful=False)
            self._dead, self._ready = None, None
            try:
                await self._spawn()
            except BaseException as exc:
                await self._kill_worker(graceful=False)
                self._die(str(exc) if isinstance(exc, EngineError) else reason)
                if self.gone:
                    log.error("%s: out of routing for good: %s", self.name, self._dead)
                raise

    def _open_log(self) -> Any:
        folder = self._log_dir or _default_log_dir()
        folder.mkdir(parents=True, exist_ok=True)
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.name)
        self._log_path = folder / f"{safe}.log"
        return self._log_path.open("ab")

    async def _spawn(self) -> None:
        env = dict(os.environ)
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(gpu) for gpu in self.config.gpu_ids)
        env[PARENT_PID_ENV] = str(os.getpid())  # a parent gone before the worker looks
        # The child must find this package even when it is not installed; appended, so that
        # the caller's own PYTHONPATH entries keep their precedence.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), _ROOT) if p)
        self._buffer.clear()
        with self._open_log() as log_file:  # the child holds its own copy of the fd
            process = self._process = await anyio.open_process(
                [sys.executable, "-m", WORKER_MODULE],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log_file,
                env=env,
                start_new_session=True,  # one process group: the worker and vLLM's children
            )
        self._pid = process.pid
        hello = Hello(
            name=self.name,
            model=self.config.model,
            gpu_ids=self.config.gpu_ids,
            engine_args=engine_args(self.config),
        )
        try:
            await self._send_to(process, hello)
            first = await self._receive(process)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            code = await _exit_code(process)
            raise self._unavailable(
                f"the worker exited with code {code} while starting (log: {self._log_path})"
            ) from None
        except (ValueError, msgspec.DecodeError) as exc:
            raise self._unavailable(f"garbled answer from the worker: {exc}") from exc
        if isinstance(first, Fatal):
            raise self._unavailable(
                f"the engine failed to start: {first.message} (log: {self._log_path})"
            )
        if not isinstance(first, Ready):
            raise self._unavailable(f"the worker answered {type(first).__name__} to Hello")
        if self._closed:
            raise self._unavailable("the engine was closed while starting")
        self._ready = first
        host = self._host = TaskHost(f"vllm-{self.name}")
        await host.open()
        host.start_soon(self._serve, process, name=f"vllm-{self.name}-service")
        log.info(
            "%s: vLLM engine ready (%s, worker pid %d; log: %s)",
            self.name,
            self.where,
            process.pid,
            self._log_path,
        )

    async def _kill_worker(self, *, graceful: bool = True) -> None:
        """Shutdown frame, then SIGTERM, then SIGKILL to the worker's whole process group
        (only the SIGKILL when not `graceful`).

        Shielded and bounded, so it completes even while the caller is being cancelled.
        """
        process, self._process = self._process, None
        host, self._host = self._host, None
        with anyio.CancelScope(shield=True):
            if process is not None and not graceful:
                await _kill_group(process.pid)
            if process is not None:
                await _stop_process(process, lambda: self._send_to(process, Shutdown()))
            if host is not None:
                await host.aclose()

    # -- the service task: reads answers, notices the worker's death ---------------------

    async def _serve(self, process: Process) -> None:
        fatal: list[str] = []
        try:
            async with anyio.create_task_group() as tg:
                eof = anyio.Event()

                async def read_frames() -> None:
                    try:
                        while True:
                            message = await self._receive(process)
                            if isinstance(message, Fatal):
                                # vLLM's engine died: fail what is in flight now, not after
                                # the worker's seconds-long vLLM shutdown.
                                fatal.append(message.message)
                                self._die(message.message)
                            elif isinstance(message, Result | Failed):
                                self._deliver(message)
                    except (
                        anyio.EndOfStream,
                        anyio.ClosedResourceError,
                        anyio.BrokenResourceError,
                    ):
                        pass
                    except (ValueError, msgspec.DecodeError) as exc:
                        self._die(f"garbled frame from the worker: {exc}")
                    finally:
                        eof.set()

                async def watch_exit() -> None:
                    code = await process.wait()
                    if not self._closed:
                        # vLLM's engine core and its workers outlive a killed worker and hold
                        # the GPU (or GBs of RAM): take the whole process group down now.
                        await _kill_group(process.pid)
                    with anyio.move_on_after(1):  # answers still in the pipe come first
                        await eof.wait()
                    detail = f": {fatal[-1]}" if fatal else ""
                    self._die(f"the worker exited with code {code}{detail}")
                    tg.cancel_scope.cancel()

                tg.start_soon(read_frames)
                tg.start_soon(watch_exit)
                await eof.wait()
                with anyio.move_on_after(TERMINATE_GRACE_S):
                    await process.wait()
                    return  # watch_exit names the exit code
                detail = f": {fatal[-1]}" if fatal else ""
                self._die(f"the worker closed its pipe{detail}")
                tg.cancel_scope.cancel()
        except Exception as exc:
            self._die(f"lost the worker: {type(exc).__name__}: {exc}")

    def _deliver(self, message: Result | Failed) -> None:
        slot = self._slots.get(message.id)
        if slot is not None:  # else it was aborted: nobody waits for it any more
            slot.answer = message
            slot.done.set()

    def _die(self, message: str) -> None:
        """Mark the engine unusable and wake every waiter; the first reason wins."""
        if self._dead is None:
            self._dead = message
            if not self._closed:
                fate = "out of use for good" if self.gone else "its worker will be restarted"
                log.error("%s: %s; %s (log: %s)", self.name, message, fate, self._log_path)
        for slot in self._slots.values():
            slot.done.set()

    # -- frames -------------------------------------------------------------------------

    async def _send(self, message: ToWorker) -> None:
        process = self._process
        if process is None:
            raise self._unavailable(self._dead or "the engine is not started")
        try:
            await self._send_to(process, message)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            self._die(f"cannot write to the worker: {type(exc).__name__}")
            raise self._unavailable(self._dead or "the worker is gone") from exc

    async def _send_to(self, process: Process, message: ToWorker) -> None:
        assert process.stdin is not None
        data = frame(message)
        async with self._send_lock:
            await process.stdin.send(data)

    async def _receive(self, process: Process) -> FromWorker:
        """The next frame; partial reads stay in the buffer, so a cancelled read loses nothing.

        :raises anyio.EndOfStream: the worker closed its stdout.
        """
        assert process.stdout is not None
        stdout = process.stdout
        buffer = self._buffer
        while True:
            if len(buffer) >= 4:
                size = int.from_bytes(buffer[:4], "big")
                if size > MAX_FRAME:
                    raise ValueError(f"frame of {size} bytes from the worker")
                if len(buffer) >= 4 + size:
                    payload = bytes(buffer[4 : 4 + size])
                    del buffer[: 4 + size]
                    message: FromWorker = self._decoder.decode(payload)
                    return message
            buffer += await stdout.receive(1 << 16)

    async def _abort(self, rid: int) -> None:
        """Tell the worker to drop a request nobody waits for, so the GPU frees its slot."""
        if self._dead is not None or self._process is None:
            return
        with anyio.CancelScope(shield=True), anyio.move_on_after(1):
            with contextlib.suppress(EngineUnavailable):
                await self._send(Abort(id=rid))

    # -- errors -------------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._closed:
            raise self._unavailable("the engine was closed")
        if self._dead is not None:
            raise self._unavailable(self._dead)

    def _outcome(self, answer: Result | Failed | None) -> Completion:
        if isinstance(answer, Result):
            self._requests += 1
            self._prompt_tokens += answer.completion.prompt_tokens
            self._completion_tokens += answer.completion.completion_tokens
            return answer.completion
        self._failures += 1
        if answer is None:
            raise self._unavailable(self._dead or "the worker is gone")
        if answer.kind == "request":
            raise EngineRequestError(self.name, f"{answer.message} ({self.where})")
        raise EngineError(self.name, f"{answer.message} ({self.where})")

    def _unavailable(self, message: str) -> EngineUnavailable:
        return EngineUnavailable(self.name, f"vLLM {self.where}: {message}")


async def _exit_code(process: Process) -> int | None:
    with anyio.move_on_after(TERMINATE_GRACE_S):
        return await process.wait()
    return None


async def _stop_process(process: Process, say_shutdown: Callable[[], Awaitable[None]]) -> None:
    if process.returncode is None:
        with anyio.move_on_after(1), contextlib.suppress(Exception):
            await say_shutdown()
        with contextlib.suppress(Exception):
            assert process.stdin is not None
            await process.stdin.aclose()  # end of stdin also means shutdown
        with anyio.move_on_after(SHUTDOWN_GRACE_S):
            await process.wait()
    if process.returncode is None:
        _signal_group(process, signal.SIGTERM)
        with anyio.move_on_after(TERMINATE_GRACE_S):
            await process.wait()
    if process.returncode is None:
        _signal_group(process, signal.SIGKILL)
        await process.wait()
    # vLLM's own children (engine core, tensor-parallel workers) share the worker's group.
    await _kill_group(process.pid)
    await process.aclose()


async def _kill_group(pgid: int) -> None:
    """SIGKILL a process group and wait (bounded) until it is gone, so that whoever closed
    the engine can count on its memory (or GPU) being free."""
    with anyio.move_on_after(GROUP_EXIT_S):
        while True:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                return
            await anyio.sleep(0.05)


def _signal_group(process: Process, sig: signal.Signals) -> None:
    """Signal the worker and its process group (it leads its own session)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)
