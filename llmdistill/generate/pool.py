"""A pool of OpenAI-compatible vLLM servers, streamed.

One asyncio loop (in a background thread) keeps up to ``capacity`` requests in flight on each
server — the server's ``max_num_seqs`` × data-parallel size read from its ``/server_info``
when vLLM serves it (``VLLM_SERVER_DEV_MODE=1``), else ``concurrency_per_server`` — so the
servers run full and nothing waits in their queues. Each request is one sample (``n = 1``),
routed to the least-loaded healthy server, and streamed (``stream: true``): every chunk of
tokens is progress.

Failures move only the failed request, to another server when there is one, with backoff:
- a connection error, an HTTP 429/5xx, an error event, or a stream that ends early;
- no new token for ``progress_timeout`` seconds once the request has started producing; time
  spent waiting for a first token (a server's queue) is not a failure;
- a server whose in-flight requests all make no progress for ``progress_timeout`` seconds,
  or that fails a health check (``GET /health`` every ``health_interval`` seconds), or that
  refuses a connection, leaves the pool: its in-flight requests are moved to the others, and
  it rejoins when ``/health`` answers again.
An HTTP 4xx other than 429 stops the run (retrying would not help). A request that failed
``max_retries + 1`` times stops the run too. A failed attempt's partial output is dropped, so
every (prompt, sample) is delivered once.

Replies are parsed straight to arrays (:mod:`.responses`); finished completions go to the
caller through a bounded queue.
"""

from __future__ import annotations

import asyncio
import queue
import random
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from llmdistill.config.base import UserError
from llmdistill.config.generate import VLLM_DEFAULT_MAX_LOGPROBS, GenerateConfig, ScoreConfig
from llmdistill.generate.engines import Completion, Finished, Work, asked_logprobs
from llmdistill.generate.responses import CompletionStream, ResponseError, parse_scored
from llmdistill.log import get_logger

logger = get_logger(__name__)
FALLBACK_CONCURRENCY = 64
JSON = {"Content-Type": "application/json"}
HEARTBEAT_S = 0.5  # the longest stream() goes without yielding, so the caller can flush on time
HEALTH_TIMEOUT_S = 10.0  # a /health that takes longer is a failed check
NO_SERVER_GRACE_S = 60.0  # the least time the pool waits for a server to come back before it gives up


# What a sampling request states besides temperature and top_p: vLLM's neutral values. A server fills
# unset fields from the model's generation_config.json (a top_k, a repetition penalty); the offline
# engine's SamplingParams never do, so without these the two backends would sample differently.
PLAIN_SAMPLING = {"top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0,
                  "frequency_penalty": 0.0}


class ServerError(UserError):
    """The servers cannot do the work: a refused request, a model they do not serve, or no server left."""


class _Retryable(Exception):
    """A failed attempt worth repeating on another server."""


@dataclass
class Server:
    """One server of the pool and what the client knows about it."""

    url: str
    capacity: int = FALLBACK_CONCURRENCY
    max_model_len: int | None = None
    healthy: bool = False
    in_flight: int = 0
    last_progress: float = 0.0  # loop time of its last chunk, or of its first request after idling
    completed: int = 0
    failed: int = 0
    attempts: set[asyncio.Task] = field(default_factory=set)


@dataclass
class _Job:
    work: Work
    tries: int = 0
    failed_on: set[str] = field(default_factory=set)
    ready_at: float = 0.0


@dataclass
class _Attempt:
    job: _Job
    server: Server
    started: float
    last_chunk: float | None = None  # None until the first chunk: queue time is not a stall
    reason: str = ""


class ServerPool:
    """Streams work through a pool of vLLM servers (see the module docstring).

    Args:
        cfg: generate or score config (server fields, sampling settings).
        scoring: score (prompt log-probs of given pairs) instead of sampling.
    """

    def __init__(self, cfg: GenerateConfig | ScoreConfig, scoring: bool = False):
        self.cfg = cfg
        self.scoring = scoring
        self.k = cfg.logprobs_top_k
        # extra entries to drop ids past the tokenizer from (known_ids_only), as far as the servers' --max-logprobs
        # allows (vLLM's default when unset): a server's LM-head rows are not known here, so asked of every model
        self.asked = asked_logprobs(self.k, VLLM_DEFAULT_MAX_LOGPROBS if cfg.max_logprobs is None else cfg.max_logprobs)
        self.model = cfg.server_model or cfg.model
        self.servers = [Server(u.rstrip("/")) for u in dict.fromkeys(cfg.server_urls)]
        self.retried = 0
        self._attempts: dict[asyncio.Task, _Attempt] = {}
        self._retries: list[_Job] = []
        self._error: BaseException | None = None
        self._changed: asyncio.Event | None = None
        self._session: Any = None
        self._results: queue.Queue | None = None

    # -- public, synchronous -------------------------------------------------------------

    def resample(self, cfg: GenerateConfig) -> None:
        """Sample the next requests with ``cfg``'s settings (temperature, top_p, max_tokens): one pool, several phases."""
        self.cfg = cfg

    def probe(self) -> list[Server]:
        """Ask every server for its health, model, context length and capacity (no work sent).

        Raises:
            ServerError: no server answers, or one serves another model.
        """
        return asyncio.run(self._with_session(self._probe_all))

    @property
    def max_model_len(self) -> int | None:
        """The smallest context length the servers report (after :meth:`probe`)."""
        lengths = [s.max_model_len for s in self.servers if s.max_model_len]
        return min(lengths) if lengths else None

    def stats(self) -> dict[str, Any]:
        """Retried attempts and completions per server, for the manifest."""
        return {"retried_requests": self.retried,
                "completions_per_server": {s.url: s.completed for s in self.servers}}

    def stream(self, work: Iterable[Work]) -> Iterator[Finished | None]:
        """Run ``work`` through the servers; yield ``(work, completion)`` as each finishes.

        Yields ``None`` when nothing finished for ``HEARTBEAT_S`` seconds.

        Raises:
            ServerError: a request was refused, failed too often, or no server was left.
        """
        results: queue.Queue = queue.Queue()
        done = object()
        loop = asyncio.new_event_loop()
        main = loop.create_task(self._with_session(lambda: self._run(iter(work), results)))

        def run() -> None:
            try:
                loop.run_until_complete(main)
                results.put(done)
            except BaseException as err:  # noqa: BLE001 - handed to the consumer thread
                results.put(err)
            finally:
                loop.close()

        thread = threading.Thread(target=run, name="server-pool", daemon=True)
        thread.start()
        try:
            while True:
                try:
                    item = results.get(timeout=HEARTBEAT_S)
                except queue.Empty:
                    yield None
                    continue
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if thread.is_alive():  # the caller stopped early: cancel what is in flight
                try:
                    loop.call_soon_threadsafe(main.cancel)
                except RuntimeError:  # the loop finished and closed meanwhile: nothing is left in flight
                    pass
            thread.join()

    # -- the loop --------------------------------------------------------------------------

    async def _with_session(self, body: Any) -> Any:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
            self._session = session
            return await body()

    async def _run(self, items: Iterator[Work], results: queue.Queue) -> None:
        self._changed, self._error, self._retries, self._attempts = asyncio.Event(), None, [], {}
        self._results = results
        await self._probe_all()
        watch = asyncio.create_task(self._watch())
        try:
            await self._dispatch(items, results)
        finally:
            watch.cancel()
            for task in list(self._attempts):
                task.cancel()
            await asyncio.gather(watch, *self._attempts, return_exceptions=True)

    async def _dispatch(self, items: Iterator[Work], results: queue.Queue) -> None:
        exhausted = False
        while True:
            if self._error is not None:
                raise self._error
            job, server = None, None
            if results.qsize() < max(64, sum(s.capacity for s in self.servers)):  # the caller keeps up
                job, server, exhausted = self._next_job(items, exhausted)
            if job is not None:
                self._launch(job, server)
                continue
            if exhausted and not self._retries and not self._attempts:
                return
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), HEARTBEAT_S)
            except TimeoutError:
                pass

    def _least_loaded(self, avoid: set[str] = frozenset()) -> Server | None:
        """The healthy server with a free slot and the fewest requests per slot, preferring those not in ``avoid``
        (while one of those is healthy, a retry waits for its slot rather than return to a server it failed on)."""
        healthy = [s for s in self.servers if s.healthy]
        preferred = [s for s in healthy if s.url not in avoid] or healthy
        free = [s for s in preferred if s.in_flight < s.capacity]
        return min(free, key=lambda s: (s.in_flight / s.capacity, s.in_flight), default=None)

    def _next_job(self, items: Iterator[Work], exhausted: bool) -> tuple[_Job | None, Server | None, bool]:
        """A retry that is due and has a server, else new work on the least-loaded server."""
        now = asyncio.get_running_loop().time()
        for i, job in enumerate(self._retries):
            if job.ready_at <= now and (server := self._least_loaded(job.failed_on)) is not None:
                return self._retries.pop(i), server, exhausted
        server = None if exhausted else self._least_loaded()
        if server is None:
            return None, None, exhausted
        work = next(items, None)
        return (None, None, True) if work is None else (_Job(work), server, False)

    def _launch(self, job: _Job, server: Server) -> None:
        """Start one attempt; its slot is taken now, so the next routing decision sees it."""
        now = asyncio.get_running_loop().time()
        if server.in_flight == 0:
            server.last_progress = now
        server.in_flight += 1
        request = self._score(job.work, server) if self.scoring else self._sample(job.work, server)
        task = asyncio.create_task(request)
        server.attempts.add(task)
        self._attempts[task] = _Attempt(job, server, now)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task) -> None:
        """An attempt ended, however it ended (even cancelled before it started): free its slot, deliver or retry."""
        attempt = self._attempts.pop(task)
        job, server = attempt.job, attempt.server
        server.in_flight -= 1
        server.attempts.discard(task)
        self._changed.set()
        if task.cancelled():
            if attempt.reason:  # cancelled by the pool (stall, server left); else the run is being stopped
                self._failed(job, server, attempt.reason)
            return
        error = task.exception()
        if error is None:
            self._results.put((job.work, task.result()))
            server.completed += 1
        elif isinstance(error, _Retryable):
            self._failed(job, server, str(error))
        elif self._error is None:  # a refused request, or a bug: stop the run with it
            self._error = error

    def _failed(self, job: _Job, server: Server, reason: str) -> None:
        job.tries += 1
        job.failed_on.add(server.url)
        server.failed += 1
        self.retried += 1
        if job.tries > self.cfg.max_retries:
            prompt_id, sample = job.work.key
            self._error = ServerError(f"prompt {prompt_id} (sample {sample}) failed {job.tries} times, last on "
                                      f"{server.url}: {reason}")
            return
        delay = self.cfg.retry_backoff * 2 ** (job.tries - 1) * (1 + random.random() / 4)
        job.ready_at = asyncio.get_running_loop().time() + delay
        self._retries.append(job)
        logger.debug("retrying %s in %.1fs after %s on %s", job.work.key, delay, reason, server.url)

    # -- one request -----------------------------------------------------------------------

    async def _post(self, server: Server, body: dict) -> Any:
        """Send one completion request; return the response once its status is 200."""
        import aiohttp

        try:
            resp = await self._session.post(server.url + "/v1/completions",
                                            data=orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), headers=JSON)
        except aiohttp.ClientConnectorError as err:  # refused or unreachable: the server is down
            self._take_out(server, f"cannot connect ({type(err).__name__})")
            raise _Retryable(f"{type(err).__name__}: {err}") from None
        except (aiohttp.ClientError, OSError) as err:
            raise _Retryable(f"{type(err).__name__}: {err}") from None
        if resp.status != 200:
            text = (await resp.read()).decode(errors="replace")[:500]
            resp.release()
            if resp.status == 429 or resp.status >= 500:
                raise _Retryable(f"HTTP {resp.status}: {text}")
            raise ServerError(f"{server.url} refused a request (HTTP {resp.status}): {text}")
        return resp

    async def _sample(self, work: Work, server: Server) -> Completion:
        import aiohttp

        cfg = self.cfg
        body = {"model": self.model, "prompt": work.request.prompt_token_ids, "n": 1, "max_tokens": cfg.max_tokens,
                "temperature": cfg.temperature, "top_p": cfg.top_p, **PLAIN_SAMPLING, "logprobs": self.asked,
                "return_tokens_as_token_ids": True, "stream": True, "stream_interval": cfg.stream_interval}
        resp = await self._post(server, body)
        attempt = self._attempts[asyncio.current_task()]
        reader = CompletionStream(self.asked)
        loop = asyncio.get_running_loop()
        try:
            async for data in resp.content.iter_any():
                chunks = reader.chunks
                reader.feed(data)
                if reader.chunks != chunks:  # tokens, not keep-alive comments, are progress
                    attempt.last_chunk = server.last_progress = loop.time()
            completion = reader.completion()
        except ResponseError as err:
            raise _Retryable(str(err)) from None
        except (aiohttp.ClientError, OSError) as err:
            raise _Retryable(f"the stream broke ({type(err).__name__}: {err})") from None
        finally:
            resp.close()  # a request given up is aborted by the server when its connection closes
        return completion

    async def _score(self, work: Work, server: Server) -> Completion:
        import aiohttp

        req = work.request
        ids = np.concatenate([req.prompt_token_ids, req.completion_token_ids])
        body = {"model": self.model, "prompt": ids, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": self.asked}
        resp = await self._post(server, body)
        try:
            data = await resp.read()
            server.last_progress = asyncio.get_running_loop().time()
            return parse_scored(data, len(req.prompt_token_ids), req.completion_token_ids, self.asked)
        except ResponseError as err:
            raise _Retryable(str(err)) from None
        except (aiohttp.ClientError, OSError) as err:
            raise _Retryable(f"the reply broke ({type(err).__name__}: {err})") from None
        finally:
            resp.close()

    # -- servers: probing, health, stalls ----------------------------------------------------

    async def _get_json(self, server: Server, path: str, timeout: float = 10.0) -> Any:
        import aiohttp

        async with self._session.get(server.url + path, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            if resp.status != 200:
                return None
            return orjson.loads(await resp.read()) if path != "/health" else True

    async def _probe(self, server: Server) -> None:
        """Health, served model, context length and capacity of one server (unhealthy if it does not answer)."""
        import aiohttp

        try:
            if not await self._get_json(server, "/health"):
                raise _Retryable("unhealthy")
            models = (await self._get_json(server, "/v1/models") or {}).get("data", [])
            info = await self._get_json(server, "/server_info?config_format=json")
        except (aiohttp.ClientError, OSError, TimeoutError, _Retryable) as err:
            logger.warning("server %s does not answer (%s): it joins the pool when it does", server.url,
                           type(err).__name__)
            return
        served = {m.get("id"): m for m in models}
        if self.model not in served:
            raise ServerError(f"{server.url} serves {sorted(served)}, not '{self.model}': set server_model")
        server.max_model_len = served[self.model].get("max_model_len")
        server.capacity = self._capacity(server, info)
        server.healthy = True

    def _capacity(self, server: Server, info: Any) -> int:
        """Requests to keep in flight on a server: the config's, else the server's max_num_seqs x DP size."""
        reported = None
        config = info.get("vllm_config") if isinstance(info, dict) else None
        if isinstance(config, dict):
            seqs = (config.get("scheduler_config") or {}).get("max_num_seqs")
            dp = (config.get("parallel_config") or {}).get("data_parallel_size") or 1
            reported = int(seqs) * int(dp) if seqs else None
        configured = self.cfg.concurrency_per_server
        if configured is not None:
            if reported is not None and configured > reported:
                logger.warning("%s runs %d sequences at once, concurrency_per_server is %d: the rest wait in its "
                               "queue", server.url, reported, configured)
            return configured
        if reported is None:
            logger.warning("%s does not report its max_num_seqs (start it with VLLM_SERVER_DEV_MODE=1, or set "
                           "concurrency_per_server): keeping %d requests in flight", server.url, FALLBACK_CONCURRENCY)
            return FALLBACK_CONCURRENCY
        return reported

    async def _probe_all(self) -> list[Server]:
        deadline = time.monotonic() + self.cfg.progress_timeout
        while True:
            await asyncio.gather(*(self._probe(s) for s in self.servers if not s.healthy))
            if any(s.healthy for s in self.servers):
                return self.servers
            if time.monotonic() > deadline:
                raise ServerError(f"no server of {[s.url for s in self.servers]} answered /health within "
                                  f"{self.cfg.progress_timeout:.0f}s (progress_timeout)")
            await asyncio.sleep(min(5.0, self.cfg.health_interval))

    def _take_out(self, server: Server, reason: str) -> None:
        """Stop routing to a server and move its in-flight requests to the others."""
        if server.healthy:
            logger.warning("server %s left the pool (%s): moving its %d requests to the others", server.url, reason,
                           server.in_flight)
        server.healthy = False
        for task in list(server.attempts):
            attempt = self._attempts.get(task)
            if task is not asyncio.current_task() and attempt is not None and not attempt.reason:
                attempt.reason = f"{server.url} left the pool ({reason})"
                task.cancel()
        if self._changed is not None:
            self._changed.set()

    async def _watch(self) -> None:
        """Stalled requests and servers every second or so; a health check of each server every ``health_interval``."""
        loop = asyncio.get_running_loop()
        timeout = self.cfg.progress_timeout
        next_health = loop.time() + self.cfg.health_interval
        checks: dict[str, asyncio.Task] = {}
        none_since: float | None = None
        try:
            while self._error is None:
                await asyncio.sleep(min(1.0, timeout / 4, self.cfg.health_interval))
                now = loop.time()
                self._stalls(now)
                if now >= next_health:
                    next_health = now + self.cfg.health_interval
                    for server in self.servers:  # in the background: a hung server must not delay the others
                        if server.url not in checks or checks[server.url].done():
                            checks[server.url] = asyncio.create_task(self._check_health(server))
                none_since = None if any(s.healthy for s in self.servers) else (none_since or now)
                if none_since is not None and now - none_since > max(timeout, NO_SERVER_GRACE_S):
                    self._error = ServerError(f"no server of {[s.url for s in self.servers]} has been healthy for "
                                              f"{now - none_since:.0f}s")
        finally:
            for task in checks.values():
                task.cancel()
            self._changed.set()

    def _stalls(self, now: float) -> None:
        """Fail requests with no new token for ``progress_timeout`` s; take out servers where none progresses."""
        timeout = self.cfg.progress_timeout
        for task, attempt in list(self._attempts.items()):
            since = attempt.last_chunk if attempt.last_chunk is not None else (
                attempt.started if self.scoring else None)  # a request waiting for its first token is queued
            if since is not None and now - since > timeout and not attempt.reason:
                attempt.reason = f"no new token for {timeout:.0f}s"
                task.cancel()
        for server in self.servers:
            if server.healthy and server.in_flight and now - server.last_progress > timeout:
                self._take_out(server, f"no progress on any of its requests for {timeout:.0f}s")

    async def _check_health(self, server: Server) -> None:
        """``GET /health``: refused or an error status takes a server out; a slow answer only if it also sends no tokens."""
        import aiohttp

        loop = asyncio.get_running_loop()
        try:
            ok, problem = bool(await self._get_json(server, "/health", timeout=HEALTH_TIMEOUT_S)), "failed its health check"
        except (aiohttp.ClientConnectorError, ConnectionError):
            ok, problem = False, "refused its health check"
        except (aiohttp.ClientError, OSError, TimeoutError):
            # a busy server can answer /health slowly while it streams: that is not a failure
            ok = server.in_flight > 0 and loop.time() - server.last_progress < HEALTH_TIMEOUT_S
            problem = f"did not answer its health check in {HEALTH_TIMEOUT_S:.0f}s"
        if not ok:
            self._take_out(server, problem)
        elif not server.healthy:
            try:
                await self._probe(server)
            except ServerError as err:  # it came back serving another model
                self._error = err
            if server.healthy:
                logger.warning("server %s is healthy again and rejoins the pool", server.url)
                self._changed.set()
