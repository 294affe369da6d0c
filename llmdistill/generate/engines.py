"""The two ways of running the teacher: an in-process vLLM engine, or OpenAI-compatible servers.

Both turn :class:`~llmdistill.generate.inputs.Request` objects into :class:`Completion`
arrays. The offline engine asks vLLM for ``flat_logprobs`` without detokenization and, through
:mod:`.vllm_patch` (on the vLLM versions it is tested with), keeps the numpy blocks vLLM's
engine core already sends: a completion's top-k become two arrays by one concatenation,
instead of one dict (or k + 1 list entries) per token — the difference between ~9x and ~1.2x
the cost of plain sampling on a tiny teacher.

vLLM's layout, per position, is ``[chosen token, top-1, ..., top-k]`` (k + 1 entries even when
the chosen token is also in the top-k), so a batch reshapes to ``[n_tokens, k + 1]``: column 0
is the chosen token and its log-prob, columns 1.. the top-k sorted by log-prob.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from llmdistill.config.base import UserError
from llmdistill.config.generate import GenerateConfig, ScoreConfig
from llmdistill.generate import vllm_patch
from llmdistill.generate.inputs import Request
from llmdistill.log import get_logger
from llmdistill.vllm_runtime import set_engine_process

logger = get_logger(__name__)


@dataclass
class Completion:
    """The teacher's output for one completion.

    Attributes:
        token_ids: [n] int32, the completion tokens.
        finish_reason: ``stop``, ``length`` or ``scored``.
        topk_ids: [n, k] int32, the k most likely ids at each position, by log-prob desc.
        topk_logprobs: [n, k] float32, their raw (T = 1) log-probs.
        token_logprobs: [n] float32, the log-prob of each completion token.
    """

    token_ids: np.ndarray
    finish_reason: str
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    token_logprobs: np.ndarray


def split_flat(
    flat_ids: list[int], flat_logprobs: list[float], lengths: Sequence[int], k: int, finish: Sequence[str]
) -> list[Completion]:
    """Cut a batch's flat ``[chosen, top-1..top-k]`` lists into one :class:`Completion` per sequence.

    Args:
        flat_ids: ids of all positions of all sequences, ``sum(lengths) * (k + 1)`` entries.
        flat_logprobs: the matching log-probs.
        lengths: tokens per sequence.
        k: top-k size.
        finish: finish reason per sequence.
    """
    ids = np.asarray(flat_ids, dtype=np.int32).reshape(-1, k + 1)
    logprobs = np.asarray(flat_logprobs, dtype=np.float32).reshape(-1, k + 1)
    out, start = [], 0
    for n, reason in zip(lengths, finish, strict=True):
        rows = slice(start, start + n)
        out.append(Completion(ids[rows, 0], reason, ids[rows, 1:], logprobs[rows, 1:], logprobs[rows, 0]))
        start += n
    return out


def _completion_arrays(lp: Any, positions: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """One completion's ``[positions, k + 1]`` ids and log-probs from vLLM's (row-block or flat) container."""
    rows = getattr(lp, "arrays", None)
    if rows is not None:
        ids, logprobs = rows()
        if positions == 0 and ids.size == 0:
            return np.zeros((0, k + 1), dtype=np.int32), np.zeros((0, k + 1), dtype=np.float32)
        if ids.shape != (positions, k + 1):
            raise RuntimeError(f"vLLM returned log-prob blocks of shape {ids.shape} for {positions} positions, "
                               f"expected {(positions, k + 1)}: this vLLM version lays out log-probs differently "
                               f"than llmdistill expects")
        return ids, logprobs
    _check_layout("logprob", len(lp.token_ids), positions, k)
    ids = np.asarray(lp.token_ids, dtype=np.int32).reshape(positions, k + 1)
    return ids, np.asarray(lp.logprobs, dtype=np.float32).reshape(positions, k + 1)


def _check_layout(name: str, got: int, positions: int, k: int) -> None:
    if got != positions * (k + 1):
        raise RuntimeError(f"vLLM returned {got} {name} entries for {positions} positions, expected "
                           f"{positions * (k + 1)} (k + 1 per position): this vLLM version lays out FlatLogprobs "
                           f"differently than llmdistill expects")


# ---------------------------------------------------------------------------------------
# In-process vLLM


class OfflineEngine:
    """A ``vllm.LLM`` built from the config. Create it under ``if __name__ == "__main__"`` or from the CLI.

    Args:
        cfg: generate or score config (engine fields).
        scoring: build the engine for prefill scoring (prefix caching off).
    """

    def __init__(self, cfg: GenerateConfig | ScoreConfig, scoring: bool = False):
        from vllm import LLM

        vllm_patch.install()
        set_engine_process(cfg.vllm_multiprocessing)
        kwargs: dict[str, Any] = dict(
            model=cfg.model, tokenizer=cfg.tokenizer, trust_remote_code=cfg.trust_remote_code, dtype=cfg.dtype,
            max_model_len=cfg.max_model_len, tensor_parallel_size=cfg.tensor_parallel_size,
            pipeline_parallel_size=cfg.pipeline_parallel_size,
            distributed_executor_backend=cfg.distributed_executor_backend,
            gpu_memory_utilization=cfg.gpu_memory_utilization, enforce_eager=cfg.enforce_eager, seed=cfg.seed,
            max_logprobs=cfg.logprobs_top_k if cfg.max_logprobs is None else cfg.max_logprobs,
        )
        if scoring:  # every prompt position must be computed, not read from the cache
            kwargs["enable_prefix_caching"] = False
        kwargs.update(cfg.engine_kwargs_dict)
        self.llm = LLM(**kwargs)
        self.k = cfg.logprobs_top_k
        self.cfg = cfg

    @property
    def max_model_len(self) -> int:
        return self.llm.llm_engine.model_config.max_model_len

    def sampling_params(self, n: int, logprobs: bool = True) -> Any:
        """The SamplingParams of every prompt (``logprobs=False``: plain sampling, for the benchmark).

        Randomness comes from the engine's ``seed``. No per-request seed: vLLM's CPU sampler cannot
        rewind a per-request generator when a prompt's prefill is split across steps, and crashes.
        """
        from vllm import SamplingParams

        cfg = self.cfg
        extra: dict[str, Any] = {}
        if logprobs:
            extra = dict(logprobs=self.k, flat_logprobs=True, detokenize=False,
                         extra_args={vllm_patch.ROWS_KEY: True})
        return SamplingParams(n=n, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens, **extra)

    def sample(self, requests: list[Request], n: int) -> list[list[Completion]]:
        """``n`` sampled completions per request, with top-k log-probs of every token."""
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=r.prompt_token_ids) for r in requests]
        outputs = self.llm.generate(prompts, self.sampling_params(n), use_tqdm=False)
        completions = []
        for result in outputs:
            for out in sorted(result.outputs, key=lambda o: o.index):
                ids, logprobs = _completion_arrays(out.logprobs, len(out.token_ids), self.k)
                if not np.array_equal(ids[:, 0], np.asarray(out.token_ids, dtype=np.int32)):
                    raise RuntimeError("vLLM's logprob entries do not start with the sampled tokens")
                completions.append(Completion(ids[:, 0], out.finish_reason or "length", ids[:, 1:],
                                              logprobs[:, 1:], logprobs[:, 0]))
        return [completions[i * n:(i + 1) * n] for i in range(len(requests))]

    def score(self, requests: list[Request]) -> list[Completion]:
        """Top-k log-probs at every completion position of (prompt, completion) requests, by one prefill."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        k = self.k
        params = SamplingParams(max_tokens=1, prompt_logprobs=k, flat_logprobs=True, detokenize=False)
        prompts = [TokensPrompt(prompt_token_ids=r.prompt_token_ids + r.completion_token_ids) for r in requests]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        flat_ids: list[int] = []
        flat_logprobs: list[float] = []
        for req, result in zip(requests, outputs, strict=True):
            pl = result.prompt_logprobs
            n_prompt = len(req.prompt_token_ids)
            total = n_prompt + len(req.completion_token_ids)
            # position 0 has no entries; position p (1..total-1) predicts token p
            _check_layout("prompt-logprob", len(pl.token_ids), total - 1, k)
            flat_ids += pl.token_ids[(n_prompt - 1) * (k + 1):]
            flat_logprobs += pl.logprobs[(n_prompt - 1) * (k + 1):]
        lengths = [len(r.completion_token_ids) for r in requests]
        return split_flat(flat_ids, flat_logprobs, lengths, k, ["scored"] * len(requests))


# ---------------------------------------------------------------------------------------
# OpenAI-compatible servers


class ServerError(UserError):
    """A server answered with an error that retrying will not fix."""


def _sorted_topk(entries: dict[str, float], k: int) -> tuple[list[int], list[float]]:
    """The k best of a ``{token: logprob}`` dict (it may also hold the chosen token), by log-prob desc."""
    best = sorted(entries.items(), key=lambda kv: -kv[1])[:k]
    return [_token_id(t) for t, _ in best], [lp for _, lp in best]


def _token_id(token: str) -> int:
    return int(token.removeprefix("token_id:"))


class ServerEngine:
    """Requests to one or more OpenAI-compatible vLLM servers, round-robin, with bounded concurrency.

    Failed requests (connection errors, timeouts, HTTP 5xx/429) are retried with exponential
    backoff, each retry on the next server.
    """

    def __init__(self, cfg: GenerateConfig | ScoreConfig):
        self.cfg = cfg
        self.urls = [u.rstrip("/") for u in cfg.server_urls]
        self.model = cfg.server_model or cfg.model
        self.k = cfg.logprobs_top_k
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(max_workers=cfg.max_concurrency)

    def _session(self) -> Any:
        import requests

        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def _call(self, index: int, method: str, path: str, body: dict | None = None) -> dict:
        import requests

        cfg = self.cfg
        for attempt in range(cfg.max_retries + 1):
            url = self.urls[(index + attempt) % len(self.urls)] + path
            try:
                resp = self._session().request(method, url, json=body, timeout=cfg.request_timeout)
                if resp.status_code < 400:
                    return resp.json()
                if resp.status_code != 429 and resp.status_code < 500:
                    raise ServerError(f"{url} refused the request (HTTP {resp.status_code}): {resp.text[:500]}")
                problem = f"HTTP {resp.status_code}"
            except (requests.ConnectionError, requests.Timeout) as err:
                problem = type(err).__name__
            if attempt < cfg.max_retries:
                delay = cfg.retry_backoff * 2**attempt * (1 + random.random() / 4)
                logger.warning("%s from %s; retry %d/%d in %.1fs", problem, url, attempt + 1, cfg.max_retries, delay)
                time.sleep(delay)
        raise ServerError(f"{path} failed {cfg.max_retries + 1} times (last: {problem} from {url})")

    def max_model_len(self) -> int | None:
        """The context length the first server reports, after checking it serves ``model``."""
        models = self._call(0, "GET", "/v1/models").get("data", [])
        served = {m.get("id"): m for m in models}
        if self.model not in served:
            raise ServerError(f"{self.urls[0]} serves {sorted(served)}, not '{self.model}': set server_model")
        return served[self.model].get("max_model_len")

    def _map(self, fn: Callable[[int, Request], Any], requests: list[Request]) -> list[Any]:
        return list(self._pool.map(fn, range(len(requests)), requests))

    def sample(self, requests: list[Request], n: int) -> list[list[Completion]]:
        """``n`` sampled completions per request, with top-k log-probs of every token."""
        return self._map(lambda i, r: self._sample_one(i, r, n), requests)

    def _sample_one(self, index: int, req: Request, n: int) -> list[Completion]:
        cfg = self.cfg
        body = {"model": self.model, "prompt": req.prompt_token_ids, "n": n, "max_tokens": cfg.max_tokens,
                "temperature": cfg.temperature, "top_p": cfg.top_p,
                "logprobs": self.k, "return_tokens_as_token_ids": True}
        choices = sorted(self._call(index, "POST", "/v1/completions", body)["choices"], key=lambda c: c["index"])
        out = []
        for choice in choices:
            lp = choice["logprobs"]
            best = [_sorted_topk(entries, self.k) for entries in lp["top_logprobs"]]
            n_tok = len(lp["tokens"])
            out.append(Completion(
                token_ids=np.asarray([_token_id(t) for t in lp["tokens"]], dtype=np.int32),
                finish_reason=choice.get("finish_reason") or "length",
                topk_ids=np.asarray([ids for ids, _ in best], dtype=np.int32).reshape(n_tok, self.k),
                topk_logprobs=np.asarray([lps for _, lps in best], dtype=np.float32).reshape(n_tok, self.k),
                token_logprobs=np.asarray(lp["token_logprobs"], dtype=np.float32),
            ))
        return out

    def score(self, requests: list[Request]) -> list[Completion]:
        """Top-k log-probs at every completion position, from the servers' prompt log-probs."""
        return self._map(self._score_one, requests)

    def _score_one(self, index: int, req: Request) -> Completion:
        ids = req.prompt_token_ids + req.completion_token_ids
        body = {"model": self.model, "prompt": ids, "max_tokens": 1, "temperature": 0.0,
                "prompt_logprobs": self.k, "return_token_ids": True}
        choice = self._call(index, "POST", "/v1/completions", body)["choices"][0]
        if choice.get("prompt_token_ids") not in (None, ids):
            raise ServerError(f"{self.urls[0]} re-tokenized prompt {req.prompt_id}: the scored ids would be wrong")
        positions = choice["prompt_logprobs"][len(req.prompt_token_ids):]
        top_ids, top_lps, token_lps = [], [], []
        for token, entries in zip(req.completion_token_ids, positions, strict=True):
            flat = {t: e["logprob"] for t, e in entries.items()}
            best_ids, best_lps = _sorted_topk(flat, self.k)
            top_ids.append(best_ids)
            top_lps.append(best_lps)
            token_lps.append(flat[str(token)])
        n = len(req.completion_token_ids)
        return Completion(np.asarray(req.completion_token_ids, dtype=np.int32), "scored",
                          np.asarray(top_ids, dtype=np.int32).reshape(n, self.k),
                          np.asarray(top_lps, dtype=np.float32).reshape(n, self.k),
                          np.asarray(token_lps, dtype=np.float32))
