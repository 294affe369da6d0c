"""vLLM's OpenAI-compatible completion responses, parsed straight into arrays.

A streamed ``/v1/completions`` reply with ``logprobs: k`` and ``return_tokens_as_token_ids``
is a series of Server-Sent Events, one per ``stream_interval`` tokens, each holding per
position a ``{"token_id:<id>": <log-prob>, ...}`` object (vLLM's ``CompletionLogProbs``).
Turning ~21 such entries per token into Python dicts and sorting them costs ~65 µs a token;
here each event is only sliced (its ``top_logprobs`` bytes are kept, nothing else is
decoded), and when the completion ends all slices become one JSON array of numbers by two
byte-level substitutions, which orjson reads in one call and numpy reshapes.

Layout, as vLLM writes it (``OpenAIServingCompletion._create_completion_logprobs``): per
position the sampled token comes first, then the top-k in rank order. When the sampled token
is itself in the top-k, its key appears once, so the position has k entries, not k + 1, and
the sampled token must be put back in its rank.
"""

from __future__ import annotations

import itertools
from operator import itemgetter

import numpy as np
import orjson

from llmdistill.generate.engines import Completion

TOP_KEY = b'"top_logprobs":['
FINISH_NULL = b'"finish_reason":null'
# vLLM sends -inf as -9999.0 ("the JSON-serializable float that OpenAI uses")
JSON_NEG_INF = -9999.0
_TO_ARRAY = bytes.maketrans(b"{}:", b"[],")
# raw top_logprobs bytes (~40 per entry) a stream keeps before turning them into arrays (8 per entry)
PARSE_EVERY_BYTES = 1 << 20
_LOGPROB = itemgetter("logprob")


class ResponseError(RuntimeError):
    """A reply that is not what vLLM sends (or an error event inside a stream)."""


def assemble(ids: np.ndarray, logprobs: np.ndarray, entries: np.ndarray, k: int) -> tuple[np.ndarray, ...]:
    """Per-position ``[chosen, top...]`` entries -> the sampled tokens and the sorted top-k.

    Args:
        ids: [sum(entries)] token ids, position after position.
        logprobs: [sum(entries)] their log-probs.
        entries: [n] entries per position: k + 1, or k when the chosen token is in the top-k.
        k: top-k size.

    Returns:
        token_ids [n] int32, topk_ids [n, k] int32, topk_logprobs [n, k] float32 (by log-prob
        desc), token_logprobs [n] float32.
    """
    bad = (entries != k) & (entries != k + 1) if k else entries != 1
    if np.any(bad):
        raise ResponseError(f"a position holds {int(entries[np.argmax(bad)])} log-prob entries, expected {k} or "
                            f"{k + 1}: the server's --max-logprobs is below logprobs_top_k, or its vLLM lays out "
                            "log-probs differently than llmdistill expects")
    starts = np.zeros(len(entries), dtype=np.int64)
    np.cumsum(entries[:-1], out=starts[1:])
    logprobs = np.where(logprobs <= JSON_NEG_INF, -np.inf, logprobs).astype(np.float32)
    take = (starts + (entries > k))[:, None] + np.arange(k)
    top_ids, top_lps = ids[take].astype(np.int32), logprobs[take]
    order = np.argsort(-top_lps, axis=1, kind="stable")  # puts a chosen token found in the top-k in its rank
    return (ids[starts].astype(np.int32), np.take_along_axis(top_ids, order, 1),
            np.take_along_axis(top_lps, order, 1), logprobs[starts])


def parse_top_logprobs(segments: list[bytes], k: int) -> tuple[np.ndarray, ...]:
    """The ``top_logprobs`` slices of a stream's events -> :func:`assemble`'s four arrays."""
    if not segments:
        return assemble(np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64), k)
    # {"token_id:5":-0.1,"token_id:9":-2.3},{...}  ->  [[5,-0.1,9,-2.3],[...]]
    blob = b"[" + b",".join(segments).replace(b'"token_id:', b"").translate(_TO_ARRAY, b'"') + b"]"
    try:
        rows = orjson.loads(blob)
    except orjson.JSONDecodeError as err:
        raise ResponseError(f"cannot read the streamed top_logprobs ({err}): is return_tokens_as_token_ids "
                            "honoured by this server?") from None
    if None in rows:
        raise ResponseError("the server sent a position without log-probs")
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    flat = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.float64, count=int(lengths.sum()))
    pairs = flat.reshape(-1, 2)
    return assemble(pairs[:, 0].astype(np.int64), pairs[:, 1], lengths // 2, k)


class CompletionStream:
    """Reads one streamed completion: feed it the bytes as they arrive, then take :meth:`completion`.

    Args:
        k: top-k size the request asked for.
    """

    def __init__(self, k: int):
        self.k = k
        self.segments: list[bytes] = []
        self.finish_reason: str | None = None
        self.done = False
        self.chunks = 0
        self._rest = b""
        self._pending_bytes = 0
        self._parsed: list[tuple[np.ndarray, ...]] = []

    def feed(self, data: bytes) -> None:
        """Consume received bytes (any split: events may span reads).

        Raises:
            ResponseError: an error event (the server failed the request mid-stream).
        """
        buf = self._rest + data if self._rest else data
        pos = 0
        while True:  # events are "data: {...}\n\n"; JSON holds no raw newline
            start = buf.find(TOP_KEY, pos)  # "text" comes before it, and no string holds the key unescaped
            if start >= 0 and buf.find(b"\n\n", pos, start) < 0:  # an event with tokens: scan its body once
                close = buf.find(b"]", start + len(TOP_KEY))  # token-id keys and numbers hold no ']'
                end = buf.find(b"\n\n", close) if close >= 0 else -1
            else:
                end = buf.find(b"\n\n", pos)
                start = -1
            if end < 0:
                break
            if start >= 0:
                self._tokens(buf, pos, start + len(TOP_KEY), close, end)
            elif buf.startswith(b"data: ", pos):
                self._bare(buf[pos + 6:end])
            pos = end + 2
        self._rest = buf[pos:]

    def _tokens(self, buf: bytes, pos: int, start: int, close: int, end: int) -> None:
        """An event with tokens: only its top_logprobs bytes, ``buf[start:close]``, are kept."""
        if close > start:
            self.segments.append(buf[start:close])
            self.chunks += 1
            self._pending_bytes += close - start
            if self._pending_bytes >= PARSE_EVERY_BYTES:  # a long completion: keep arrays, not text
                self._parsed.append(parse_top_logprobs(self.segments, self.k))
                self.segments, self._pending_bytes = [], 0
        if buf.find(FINISH_NULL, close, end) < 0:
            self._other(orjson.loads(buf[pos + 6:start] + buf[close:end]))

    def _bare(self, body: bytes) -> None:
        """An event without tokens: [DONE], an error, or a chunk with only a finish reason."""
        if body == b"[DONE]":
            self.done = True
        else:
            self._other(orjson.loads(body))

    def _other(self, obj: dict) -> None:
        if "error" in obj or obj.get("object") == "error":
            error = obj.get("error", obj)
            raise ResponseError(f"the server failed the request: {error.get('message', error) if isinstance(error, dict) else error}")
        for choice in obj.get("choices") or ():
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]

    def completion(self) -> Completion:
        """The finished completion as arrays.

        Raises:
            ResponseError: the stream ended before its last chunk, or finished abnormally.
        """
        if not self.done or self.finish_reason is None:
            raise ResponseError("the stream ended before the completion finished")
        if self.finish_reason not in ("stop", "length"):
            raise ResponseError(f"the server ended the completion with finish_reason '{self.finish_reason}'")
        parts = [*self._parsed, parse_top_logprobs(self.segments, self.k)]
        token_ids, top_ids, top_lps, token_lps = (np.concatenate(a) for a in zip(*parts, strict=True))
        return Completion(token_ids, self.finish_reason, top_ids, top_lps, token_lps)


def parse_scored(body: bytes, prompt_len: int, completion_ids: np.ndarray, k: int) -> Completion:
    """A non-streamed ``prompt_logprobs`` reply (``score``) -> the top-k at every completion position.

    Args:
        body: the response body.
        prompt_len: tokens of the prompt before the completion.
        completion_ids: [n] the scored completion's token ids.
        k: top-k size.

    Raises:
        ResponseError: the reply does not hold one log-prob entry per completion token.
    """
    choice = orjson.loads(body)["choices"][0]
    positions = (choice.get("prompt_logprobs") or [])[prompt_len:]
    if len(positions) != len(completion_ids) or None in positions:
        raise ResponseError(f"the server returned {len(positions)} prompt log-prob positions for "
                            f"{len(completion_ids)} completion tokens")
    entries = np.fromiter(map(len, positions), dtype=np.int64, count=len(positions))
    ids = np.fromiter(map(int, itertools.chain.from_iterable(positions)), dtype=np.int64, count=int(entries.sum()))
    lps = np.fromiter(map(_LOGPROB, itertools.chain.from_iterable(p.values() for p in positions)), dtype=np.float64,
                      count=len(ids))
    token_ids, top_ids, top_lps, token_lps = assemble(ids, lps, entries, k)
    if not np.array_equal(token_ids, completion_ids):
        raise ResponseError("the server scored other tokens than sent (it re-tokenized the prompt)")
    return Completion(token_ids, "scored", top_ids, top_lps, token_lps)
