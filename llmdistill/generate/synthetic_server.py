"""A synthetic OpenAI-compatible completions server that answers in vLLM's exact format (tests, benchmarks).

It runs no model: each completion is made from the prompt by :func:`teacher_output` (so a
client's arrays can be checked), and its replies are built with vLLM's own protocol classes
and log-prob code (``CompletionStreamResponse``, ``OpenAIServingCompletion._create_completion_logprobs``,
``append_logprobs_for_next_position``), serialized as vLLM's server does. Replies are built
once per (prompt, length) and cached, so the server answers far faster than a client parses:
what a benchmark against it measures is the client.

Faults for the pool's tests: refuse the first requests with an HTTP status, stop sending after
some chunks (a stall), drop the connection after some chunks, or :meth:`SyntheticServer.stop`
(a server that dies).

    python -m llmdistill.generate.synthetic_server --port 8100 --tokens 4096
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import threading
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

VOCAB = 151_936
MODEL = "synthetic"


def teacher_output(seed: int, n: int, k: int, vocab: int = VOCAB) -> tuple[np.ndarray, ...]:
    """A made-up completion: token ids [n], top-k ids [n, k], top-k log-probs [n, k], token log-probs [n].

    Every fifth token is sampled from outside the top-k (vLLM then sends k + 1 entries for that
    position); the others are the top-1 (k entries). Log-probs are float32 values, distinct per row.
    """
    rng = np.random.default_rng(seed)
    top_ids = np.stack([rng.choice(vocab, size=k + 1, replace=False) for _ in range(n)]) if n else np.zeros((0, k + 1))
    top_lps = -np.sort(rng.uniform(0.01, 12.0, size=(n, k + 1)), axis=1).astype(np.float32)
    outside = np.arange(n) % 5 == 4
    token_ids = np.where(outside, top_ids[:, -1] if k else top_ids[:, 0], top_ids[:, 0]).astype(np.int32)
    token_lps = np.where(outside, top_lps[:, -1] if k else top_lps[:, 0], top_lps[:, 0]).astype(np.float32)
    return token_ids, top_ids[:, :k].astype(np.int32), top_lps[:, :k], token_lps


def _position_dicts(token_ids: np.ndarray, top_ids: np.ndarray, top_lps: np.ndarray, token_lps: np.ndarray) -> list:
    """Per position ``{token id: Logprob}`` as vLLM's output processor builds them (chosen token first)."""
    from vllm.logprobs import append_logprobs_for_next_position, create_sample_logprobs

    k = top_ids.shape[1]
    out = create_sample_logprobs(flat_logprobs=False)
    for i, token in enumerate(token_ids.tolist()):
        in_top = np.flatnonzero(top_ids[i] == token)
        rank = int(in_top[0]) + 1 if len(in_top) else k + 1
        append_logprobs_for_next_position(out, [token, *top_ids[i].tolist()], [float(token_lps[i]), *map(float, top_lps[i])],
                                          [None] * (k + 1), rank, k)
    return out


def stream_events(arrays: tuple[np.ndarray, ...], interval: int, finish_reason: str = "length",
                  model: str = MODEL) -> list[bytes]:
    """The SSE events of one streamed completion, ``interval`` tokens per event, as vLLM's server sends them."""
    from vllm.entrypoints.openai.completion.protocol import (
        CompletionResponseStreamChoice,
        CompletionStreamResponse,
    )
    from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion

    token_ids, top_ids, top_lps, token_lps = arrays
    k = top_ids.shape[1]
    serving = SimpleNamespace(_get_decoded_token=OpenAIServingCompletion._get_decoded_token,
                              return_tokens_as_token_ids=True)
    positions = _position_dicts(*arrays)
    events, offset = [], 0
    for start in range(0, len(token_ids), interval):
        end = min(start + interval, len(token_ids))
        logprobs = OpenAIServingCompletion._create_completion_logprobs(
            serving, token_ids=token_ids[start:end].tolist(), top_logprobs=positions[start:end],
            num_output_top_logprobs=k, tokenizer=None, initial_text_offset=offset, return_as_token_id=True)
        if logprobs.tokens:
            offset = logprobs.text_offset[-1] + len(logprobs.tokens[-1])
        chunk = CompletionStreamResponse(
            id="cmpl-synthetic", object="text_completion", created=0, model=model,
            choices=[CompletionResponseStreamChoice(
                index=0, text="", logprobs=logprobs, finish_reason=finish_reason if end == len(token_ids) else None,
                stop_reason=None, prompt_token_ids=None, token_ids=None)])
        events.append(f"data: {chunk.model_dump_json(exclude_unset=True)}\n\n".encode())
    events.append(b"data: [DONE]\n\n")
    return events


def completion_body(arrays: tuple[np.ndarray, ...], model: str = MODEL) -> bytes:
    """The non-streamed reply to a sampling request (one choice), as vLLM's server sends it."""
    from vllm.entrypoints.openai.completion.protocol import CompletionResponse, CompletionResponseChoice
    from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
    from vllm.entrypoints.serve.engine.protocol import UsageInfo

    serving = SimpleNamespace(_get_decoded_token=OpenAIServingCompletion._get_decoded_token,
                              return_tokens_as_token_ids=True)
    logprobs = OpenAIServingCompletion._create_completion_logprobs(
        serving, token_ids=arrays[0].tolist(), top_logprobs=_position_dicts(*arrays),
        num_output_top_logprobs=arrays[1].shape[1], tokenizer=None, return_as_token_id=True)
    n = len(arrays[0])
    reply = CompletionResponse(id="cmpl-synthetic", created=0, model=model, choices=[CompletionResponseChoice(
        index=0, text="", logprobs=logprobs, finish_reason="length", stop_reason=None)],
        usage=UsageInfo(prompt_tokens=1, completion_tokens=n, total_tokens=n + 1))
    return json.dumps(reply.model_dump(), ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def scored_arrays(prompt: list[int], k: int) -> tuple[np.ndarray, ...]:
    """What the server scores for a prompt: at every position after the first, the actual next token
    (never in the made-up top-k, below all of it), the top-k ids and log-probs, and the token's log-prob."""
    _, top_ids, top_lps, _ = teacher_output(_seed(prompt), len(prompt) - 1, k)
    actual = np.asarray(prompt[1:], dtype=np.int32)
    top_ids = np.where(top_ids == actual[:, None], (top_ids + 1) % VOCAB, top_ids).astype(np.int32)
    token_lps = ((top_lps[:, -1] if k else np.zeros(len(actual), np.float32)) - 1.0).astype(np.float32)
    return actual, top_ids, top_lps, token_lps


def scored_body(prompt: list[int], k: int, model: str = MODEL) -> bytes:
    """The non-streamed reply to a ``prompt_logprobs`` request (``score``), as vLLM's server sends it."""
    from vllm.entrypoints.openai.completion.protocol import CompletionResponse, CompletionResponseChoice
    from vllm.entrypoints.serve.engine.protocol import UsageInfo

    positions = [None, *_position_dicts(*scored_arrays(prompt, k))]
    reply = CompletionResponse(id="cmpl-synthetic", created=0, model=model, choices=[CompletionResponseChoice(
        index=0, text="", logprobs=None, finish_reason="length", stop_reason=None, prompt_logprobs=positions)],
        usage=UsageInfo(prompt_tokens=len(prompt), completion_tokens=1, total_tokens=len(prompt) + 1))
    # starlette's JSONResponse rendering
    return json.dumps(reply.model_dump(), ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def _seed(prompt: list[int]) -> int:
    return int(np.sum(np.asarray(prompt, dtype=np.int64) * 7919) % 1_000_003)


@functools.lru_cache(maxsize=256)
def _cached_events(seed: int, n: int, k: int, interval: int) -> tuple[bytes, ...]:
    return tuple(stream_events(teacher_output(seed, n, k), interval))


@functools.lru_cache(maxsize=64)
def _cached_body(seed: int, n: int, k: int) -> bytes:
    return completion_body(teacher_output(seed, n, k))


def expected_completion(prompt: list[int], max_tokens: int, k: int, tokens: int) -> tuple[np.ndarray, ...]:
    """What :class:`SyntheticServer` streams for a prompt: :func:`teacher_output` of its seed."""
    return teacher_output(_seed(prompt), min(max_tokens, tokens), k)


@dataclass
class Faults:
    """Misbehaviour of a :class:`SyntheticServer` (all off by default)."""

    fail_first: int = 0  # answer the first N completion requests with ``fail_status``
    fail_status: int = 503
    stall_after: int | None = None  # chunks sent before the stream stops (connection kept open)
    drop_after: int | None = None  # chunks sent before the connection is closed
    faulty_requests: int | None = None  # stall/drop only the first N streams (None: all)


class SyntheticServer:
    """The server, on 127.0.0.1 in a background thread (or run it in its own process with ``__main__``).

    Args:
        tokens: completion length (capped by each request's ``max_tokens``).
        capacity: max_num_seqs to report at ``/server_info`` (None: no ``/server_info``, as without dev mode).
        faults: misbehaviour for tests.
        model: the served model name.
    """

    def __init__(self, tokens: int = 64, capacity: int | None = None, faults: Faults | None = None,
                 model: str = MODEL, port: int = 0):
        self.tokens, self.capacity, self.faults, self.model, self.port = tokens, capacity, faults or Faults(), model, port
        self.requests = 0
        self.streams = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> SyntheticServer:
        """Serve from a background thread; returns once it accepts connections."""
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self.listen())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="synthetic-server", daemon=True)
        self._thread.start()
        ready.wait()
        return self

    async def listen(self) -> None:
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        """Die: stop listening and drop every open connection."""
        async def close() -> None:
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            handlers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in handlers:
                task.cancel()
            await asyncio.gather(*handlers, return_exceptions=True)

        if self._loop is not None:
            asyncio.run_coroutine_threadsafe(close(), self._loop).result()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop = None

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                method, path, _ = line.decode().split(" ", 2)
                length = 0
                while (header := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = header.decode().partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                body = await reader.readexactly(length) if length else b""
                if not await self._route(method, path, body, writer):
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _route(self, method: str, path: str, body: bytes, writer: asyncio.StreamWriter) -> bool:
        if path == "/health":
            return await self._json(writer, b"")
        if path == "/v1/models":
            return await self._json(writer, json.dumps({"object": "list", "data": [
                {"id": self.model, "object": "model", "max_model_len": 1 << 20}]}).encode())
        if path.startswith("/server_info") and self.capacity is not None:
            return await self._json(writer, json.dumps({"vllm_config": {
                "scheduler_config": {"max_num_seqs": self.capacity}, "parallel_config": {"data_parallel_size": 1}}}).encode())
        if path == "/v1/completions" and method == "POST":
            return await self._completion(json.loads(body), writer)
        return await self._json(writer, b'{"detail":"Not Found"}', status="404 Not Found")

    async def _json(self, writer: asyncio.StreamWriter, body: bytes, status: str = "200 OK") -> bool:
        writer.write(f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
                     .encode() + body)
        await writer.drain()
        return True

    async def _completion(self, request: dict, writer: asyncio.StreamWriter) -> bool:
        self.requests += 1
        faults = self.faults
        if self.requests <= faults.fail_first:
            return await self._json(writer, b'{"error":{"message":"synthetic failure"}}',
                                    status=f"{faults.fail_status} Synthetic")
        prompt = request["prompt"]
        k = request.get("logprobs") or request.get("prompt_logprobs") or 0
        if request.get("prompt_logprobs"):
            return await self._json(writer, scored_body(prompt, k, self.model))
        if not request.get("stream"):  # a whole completion in one reply (what llmdistill's client did before streaming)
            return await self._json(writer, _cached_body(_seed(prompt), min(request["max_tokens"], self.tokens), k))
        self.streams += 1
        events = _cached_events(_seed(prompt), min(request["max_tokens"], self.tokens), k,
                                request.get("stream_interval") or 1)
        faulty = faults.faulty_requests is None or self.streams <= faults.faulty_requests
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for i, event in enumerate(events):
            if faulty and faults.stall_after is not None and i >= faults.stall_after:
                await asyncio.sleep(3600)
            if faulty and faults.drop_after is not None and i >= faults.drop_after:
                writer.transport.abort()
                return False
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--capacity", type=int, default=None)
    args = parser.parse_args()
    server = SyntheticServer(tokens=args.tokens, capacity=args.capacity, port=args.port)

    async def serve() -> None:
        await server.listen()
        print(server.url, flush=True)
        await asyncio.Event().wait()

    asyncio.run(serve())


if __name__ == "__main__":
    _main()
