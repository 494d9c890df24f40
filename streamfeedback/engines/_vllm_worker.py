"""The vLLM worker: one OS process that owns one `AsyncLLMEngine` and the GPU(s) it runs on.

vLLM cannot run several engines on different GPUs in one process, so `VLLMEngine` (the
parent side, `_vllm.py`) spawns `python -m streamfeedback.engines._vllm_worker` with
`CUDA_VISIBLE_DEVICES` already set, and talks to it over the child's stdin/stdout.

Wire format: each message is one msgpack frame behind a 4-byte big-endian length, and the
message types form a msgspec tagged union, so either side rejects a garbled stream instead of
misreading it. Conversation:

    parent                              worker
    Hello(model, engine_args, ...)  ->
                                    <-  Ready(pid, max_model_len) | Fatal(message)
    Generate(id, request)           ->  (many at once; one asyncio task each)
    Abort(id)                       ->  cancels that task, so vLLM frees the sequence
                                    <-  Result(id, completion) | Failed(id, kind, message)
    Shutdown | end of stdin         ->  cancel everything, engine.shutdown(), exit 0

A parent that dies without a word (kill -9, the OOM killer) is noticed by a watchdog thread,
also while the engine loads and the event loop is blocked: it kills the worker's process group
(vLLM's engine core included), so no GPU stays held by an orphan.

This module imports vllm only inside `main()`'s engine build: the parent imports it for the
message types and must never pull vllm (or CUDA) in. The worker runs plain asyncio, not anyio
cancel scopes: vLLM's generators are asyncio-native and clean up (abort the request) on a single
edge-triggered `CancelledError`, which is exactly what `Task.cancel()` delivers.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any, Literal

import msgspec

from .._records import ChatRequest, Completion

__all__ = [
    "Abort",
    "Failed",
    "Fatal",
    "FromWorker",
    "Generate",
    "Hello",
    "PARENT_PID_ENV",
    "Ready",
    "Result",
    "Shutdown",
    "ToWorker",
    "frame",
    "main",
]

logger = logging.getLogger("streamfeedback.vllm_worker")

MAX_FRAME = 64 * 1024 * 1024
PARENT_PID_ENV = "STREAMFEEDBACK_PARENT_PID"
"""Set by the parent: a worker whose parent died while Python started still sees it gone."""


class _Message(msgspec.Struct, tag=True, frozen=True, kw_only=True):
    """Base of every frame: the class name is the tag, so one decoder reads the union."""


class Hello(_Message, frozen=True, kw_only=True):
    """The engine to build. `engine_args` holds only keys the config sets (see `_vllm.py`)."""

    name: str
    model: str
    gpu_ids: list[int]
    engine_args: dict[str, Any]


class Generate(_Message, frozen=True, kw_only=True):
    id: int
    request: ChatRequest


class Abort(_Message, frozen=True, kw_only=True):
    id: int


class Shutdown(_Message, frozen=True, kw_only=True):
    pass


class Ready(_Message, frozen=True, kw_only=True):
    """The engine is built and serving. `max_model_len` is the engine's own where it says."""

    pid: int
    max_model_len: int | None = None
    vllm_version: str | None = None


class Result(_Message, frozen=True, kw_only=True):
    id: int
    completion: Completion


class Failed(_Message, frozen=True, kw_only=True):
    """One request failed: `kind="request"` when the request itself is at fault."""

    id: int
    kind: Literal["request", "engine"]
    message: str


class Fatal(_Message, frozen=True, kw_only=True):
    """The engine cannot be built or has died; the worker exits after sending it."""

    message: str


ToWorker = Hello | Generate | Abort | Shutdown
FromWorker = Ready | Result | Failed | Fatal

_encoder = msgspec.msgpack.Encoder()


def frame(message: ToWorker | FromWorker) -> bytes:
    """One length-prefixed frame, ready to write."""
    payload = _encoder.encode(message)
    return len(payload).to_bytes(4, "big") + payload


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _is_request_error(exc: BaseException) -> bool:
    """vLLM rejects bad requests (prompt too long, bad params) with a ValueError subclass;
    newer versions wrap unexpected errors in EngineGenerateError, so look at the cause too."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ValueError) or type(seen).__name__ in {
            "VLLMValidationError",
            "VLLMClientError",
        }:
            return True
        seen = seen.__cause__
    return False


def _is_engine_dead(exc: BaseException, engine: Any) -> bool:
    if type(exc).__name__ in {"EngineDeadError", "AsyncEngineDeadError"}:
        return True
    return bool(getattr(engine, "errored", False))


def _token_ids(rendered: Any) -> list[int]:
    """apply_chat_template(tokenize=True) gives a list of ids, or (transformers 5, some
    wrappers) a mapping with `input_ids`, sometimes batched."""
    if isinstance(rendered, Mapping) or hasattr(rendered, "input_ids"):
        rendered = rendered["input_ids"] if isinstance(rendered, Mapping) else rendered.input_ids
    ids = list(rendered)
    if ids and isinstance(ids[0], list | tuple):
        ids = list(ids[0])
    return [int(i) for i in ids]


def _structured_outputs(vllm: Any) -> tuple[str, Any] | None:
    """(SamplingParams keyword, factory from a regex) for guided answers in this vLLM:
    `structured_outputs` (0.11+), `guided_decoding` before; None where neither exists."""
    with contextlib.suppress(ImportError):
        from vllm.sampling_params import StructuredOutputsParams

        return "structured_outputs", lambda regex: StructuredOutputsParams(regex=regex)
    with contextlib.suppress(ImportError):
        from vllm.sampling_params import GuidedDecodingParams

        return "guided_decoding", lambda regex: GuidedDecodingParams(regex=regex)
    return None


class _Worker:
    """The serving loop: reads frames, runs one task per request, writes answers."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = msgspec.msgpack.Decoder(ToWorker)
        self.write_lock = asyncio.Lock()
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.engine: Any = None
        self.tokenizer: Any = None
        self.vllm: Any = None
        self.output_kind: Any = None
        self.structured: Any = None
        self.max_model_len: int | None = None
        self.dead = False

    async def read(self) -> ToWorker | None:
        try:
            head = await self.reader.readexactly(4)
            size = int.from_bytes(head, "big")
            if size > MAX_FRAME:
                raise ValueError(f"frame of {size} bytes is too large")
            message: ToWorker = self.decoder.decode(await self.reader.readexactly(size))
            return message
        except asyncio.IncompleteReadError:
            return None

    async def send(self, message: FromWorker) -> None:
        async with self.write_lock:
            self.writer.write(frame(message))
            await self.writer.drain()

    async def build(self, hello: Hello) -> Ready:
        import vllm  # only here: the parent process never imports vllm

        self.vllm = vllm
        try:
            from vllm.sampling_params import RequestOutputKind

            self.output_kind = RequestOutputKind.FINAL_ONLY
        except ImportError:  # older vLLM: every step is yielded, we keep the last
            self.output_kind = None
        self.structured = _structured_outputs(vllm)
        args_type = vllm.AsyncEngineArgs
        kwargs = dict(hello.engine_args)
        fields = set(getattr(args_type, "__dataclass_fields__", {}))
        if "disable_log_requests" in fields and "enable_log_requests" not in fields:
            kwargs.setdefault("disable_log_requests", True)  # one log line per request
        args = args_type(model=hello.model, **kwargs)
        self.engine = vllm.AsyncLLMEngine.from_engine_args(args)
        tokenizer = self.engine.get_tokenizer()
        if inspect.isawaitable(tokenizer):  # a coroutine in early V1 releases
            tokenizer = await tokenizer
        self.tokenizer = tokenizer
        try:  # a model without a chat template would fail every request: fail the start
            self.render([{"role": "user", "content": "Hello"}])
        except Exception as exc:
            raise RuntimeError(
                f"the model's chat template does not work: {_describe(exc)}"
            ) from exc
        configured = hello.engine_args.get("max_model_len")
        model_config = getattr(self.engine, "model_config", None)
        actual = getattr(model_config, "max_model_len", None)
        self.max_model_len = configured or (actual if isinstance(actual, int) else None)
        return Ready(
            pid=os.getpid(),
            max_model_len=self.max_model_len,
            vllm_version=getattr(vllm, "__version__", None),
        )

    async def serve(self) -> int:
        hello = await self.read()
        if not isinstance(hello, Hello):
            logger.error("expected a Hello frame first, got %r", hello)
            return 2
        try:
            ready = await self.build(hello)
        except Exception as exc:
            logger.exception("vLLM engine for %s failed to start", hello.model)
            await self.send(Fatal(message=_describe(exc)))
            return 1
        await self.send(ready)
        try:
            while not self.dead:
                message = await self.read()
                if message is None or isinstance(message, Shutdown):
                    break
                if isinstance(message, Generate):
                    self.spawn(message)
                elif isinstance(message, Abort):
                    running = self.tasks.get(message.id)
                    if running is not None:
                        running.cancel()
        finally:
            await self.stop()
        return 3 if self.dead else 0

    def spawn(self, message: Generate) -> None:
        task = asyncio.ensure_future(self.run(message.id, message.request))
        self.tasks[message.id] = task

        def forget(_: asyncio.Task[None]) -> None:
            if self.tasks.get(message.id) is task:
                del self.tasks[message.id]

        task.add_done_callback(forget)

    async def stop(self) -> None:
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        shutdown = getattr(self.engine, "shutdown", None) or getattr(
            self.engine, "shutdown_background_loop", None
        )
        if callable(shutdown):
            try:
                result = shutdown()
                if inspect.isawaitable(result):
                    await result
            except Exception:
                logger.exception("engine shutdown failed")
        # AsyncLLM.__del__ shuts down again; at interpreter exit its module globals are gone
        # and it prints a TypeError traceback. Collect it now, while everything still exists.
        self.engine = None
        gc.collect()

    def engine_input(self, ids: list[int]) -> Any:
        """The prompt as this vLLM wants it: rendered by the engine's own renderer where it has
        one (newer releases deprecate raw prompts), a plain TokensPrompt before that."""
        renderer = getattr(self.engine, "renderer", None)
        tokens_prompt = getattr(self.vllm, "TokensPrompt", dict)
        if renderer is not None and hasattr(renderer, "render_cmpl"):
            (rendered,) = renderer.render_cmpl([tokens_prompt(prompt_token_ids=ids)])
            return rendered
        return tokens_prompt(prompt_token_ids=ids)

    def render(self, messages: list[dict[str, str]]) -> list[int]:
        rendered = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True
        )
        return _token_ids(rendered)

    async def run(self, rid: int, request: ChatRequest) -> None:
        started = time.perf_counter()
        try:
            try:
                ids = self.render(
                    [{"role": m.role, "content": m.content} for m in request.messages]
                )
            except Exception as exc:  # e.g. "System role not supported": the request's fault
                await self.send(Failed(id=rid, kind="request", message=_describe(exc)))
                return
            max_tokens = request.max_tokens
            if self.max_model_len is not None:
                if len(ids) + 1 > self.max_model_len:
                    await self.send(
                        Failed(
                            id=rid,
                            kind="request",
                            message=f"the prompt is {len(ids)} tokens; max_model_len is "
                            f"{self.max_model_len}, which must also fit one output token",
                        )
                    )
                    return
                max_tokens = min(max_tokens, self.max_model_len - len(ids))
            options: dict[str, Any] = {
                "max_tokens": max_tokens,  # vLLM's default is 16: always set it
                "temperature": request.temperature,
                "top_p": request.top_p,
                "seed": request.seed,
            }
            if self.output_kind is not None:
                options["output_kind"] = self.output_kind
            if request.guide is not None:
                if self.structured is None:
                    raise ValueError("this vLLM version has no structured outputs")
                key, make = self.structured
                options[key] = make(request.guide)
            params = self.vllm.SamplingParams(**options)
            prompt = self.engine_input(ids)
            final: Any = None
            stream = self.engine.generate(prompt, params, f"{request.id}#{rid}")
            async with contextlib.aclosing(stream):  # closing aborts the request in vLLM
                async for output in stream:
                    final = output
            if final is None or not final.outputs:
                raise RuntimeError("the engine finished without an output")
            out = final.outputs[0]
            prompt_ids = getattr(final, "prompt_token_ids", None)
            completion = Completion(
                text=out.text,
                prompt_tokens=len(prompt_ids) if prompt_ids is not None else len(ids),
                completion_tokens=len(out.token_ids),
                finish_reason=None if out.finish_reason is None else str(out.finish_reason),
                latency_s=time.perf_counter() - started,
            )
            await self.send(Result(id=rid, completion=completion))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if _is_engine_dead(exc, self.engine):
                if self.dead:  # every request in flight fails alike: one traceback is enough
                    return
                logger.exception("the vLLM engine died")
                self.dead = True
                with contextlib.suppress(Exception):
                    await self.send(Fatal(message=f"the vLLM engine died: {_describe(exc)}"))
                self.reader.feed_eof()  # wake the serving loop so the worker exits
                return
            kind: Literal["request", "engine"] = "request" if _is_request_error(exc) else "engine"
            if kind == "engine":
                logger.exception("request %s failed", request.id)
            await self.send(Failed(id=rid, kind=kind, message=_describe(exc)))


async def _serve(proto_in: int, proto_out: int) -> int:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_FRAME)
    await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(proto_in, "rb", buffering=0)
    )
    transport, protocol = await loop.connect_write_pipe(
        asyncio.streams.FlowControlMixin, os.fdopen(proto_out, "wb", buffering=0)
    )
    writer = asyncio.StreamWriter(transport, protocol, None, loop)
    try:
        return await _Worker(reader, writer).serve()
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def _die_with_parent(parent: int) -> None:
    """Poll the parent pid: once this process is re-parented, its parent is gone."""
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            if os.getpgrp() == os.getpid():  # our own group (the parent starts a new session)
                os.killpg(os.getpid(), signal.SIGKILL)
            os._exit(1)


def main() -> int:
    """Entry point of the child. First thing: take fds 0 and 1 for the protocol and point the
    real stdin/stdout elsewhere, so nothing vLLM (or a library it loads) prints can corrupt a
    frame, and nothing it reads can steal one. Its logs go to stderr, which is inherited."""
    parent = int(os.environ.get(PARENT_PID_ENV) or os.getppid())
    threading.Thread(
        target=_die_with_parent, args=(parent,), name="parent-watchdog", daemon=True
    ).start()
    proto_in = os.dup(0)
    proto_out = os.dup(1)
    os.dup2(2, 1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s"
    )
    try:
        return asyncio.run(_serve(proto_in, proto_out))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
