"""The teacher as a stream: units of work in, finished completions out, in the order they finish.

Two engines share this interface (:meth:`OfflineEngine.stream`, and
:meth:`llmdistill.generate.pool.ServerPool.stream` for OpenAI-compatible servers): they take
an iterator of :class:`Work` (one prompt and sample index to sample, or one pair to score),
keep a bounded number in flight, add a new one as soon as one finishes, and yield
``(work, completion)`` as each finishes, or ``None`` now and then while nothing did (so the
caller can flush on time). No batch waits for its slowest sequence, and memory is bounded by
what is in flight, not by the number of prompts.

The offline engine asks vLLM for ``flat_logprobs`` without detokenization and, through
:mod:`.vllm_patch` (on the vLLM versions it is tested with), keeps the numpy blocks vLLM's
engine core already sends: a completion's top-k become two arrays by one concatenation,
instead of one dict (or k + 1 list entries) per token — the difference between ~9x and ~1.2x
the cost of plain sampling on a tiny teacher.

vLLM's layout, per position, is ``[chosen token, top-1, ..., top-k]`` (k + 1 entries even when
the chosen token is also in the top-k), so a completion reshapes to ``[n_tokens, k + 1]``:
column 0 is the chosen token and its log-prob, columns 1.. the top-k sorted by log-prob.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from llmdistill.config.generate import GenerateConfig, ScoreConfig
from llmdistill.formats import UNKNOWN_TOKEN
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
        finish_reason: ``stop``, ``length``, ``scored`` or ``unknown_token`` (:func:`known_ids_only`).
        topk_ids: [n, k] int32, the k most likely ids at each position, by log-prob desc.
        topk_logprobs: [n, k] float32, their raw (T = 1) log-probs.
        token_logprobs: [n] float32, the log-prob of each completion token.
    """

    token_ids: np.ndarray
    finish_reason: str
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    token_logprobs: np.ndarray


@dataclass(frozen=True)
class Work:
    """One unit of teacher work: sample ``sample_index`` of a prompt, or score one (prompt, completion) pair."""

    request: Request
    sample_index: int

    @property
    def key(self) -> tuple[str, int]:
        """The (prompt id, sample index) this work writes: the unit of resume and exactly-once."""
        return self.request.prompt_id, self.sample_index

    @property
    def token_ids(self) -> list[int]:
        """What the engine reads: the prompt, plus the completion when scoring."""
        ids = self.request.prompt_token_ids.tolist()
        return ids if self.request.completion_token_ids is None else ids + self.request.completion_token_ids.tolist()


Finished = tuple[Work, Completion]


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
    return _flat_arrays("logprob", lp.token_ids, lp.logprobs, positions, k)


def _flat_arrays(name: str, ids: list[int], logprobs: list[float], positions: int, k: int) -> tuple[np.ndarray, ...]:
    if len(ids) != positions * (k + 1):
        raise RuntimeError(f"vLLM returned {len(ids)} {name} entries for {positions} positions, expected "
                           f"{positions * (k + 1)} (k + 1 per position): this vLLM version lays out FlatLogprobs "
                           f"differently than llmdistill expects")
    return (np.asarray(ids, dtype=np.int32).reshape(positions, k + 1),
            np.asarray(logprobs, dtype=np.float32).reshape(positions, k + 1))


#: Log-probs asked for beyond ``k`` when ids past the tokenizer may rank (:func:`asked_logprobs`), so that
#: dropping them (:func:`known_ids_only`) still leaves the k best known ids.
PADDING_MARGIN = 8


def asked_logprobs(k: int, cap: int) -> int:
    """How many log-probs to ask an engine for per position: ``k``, plus up to :data:`PADDING_MARGIN`
    that its ``max_logprobs`` (``cap``; negative: no cap, as vLLM's -1) allows (none when ``k`` is 0)."""
    if not k:
        return 0
    return k + (PADDING_MARGIN if cap < 0 else max(0, min(PADDING_MARGIN, cap - k)))


def known_ids_only(completion: Completion, limit: int, k: int) -> Completion:
    """The completion with only ids below ``limit`` (the ids a tokenizer, or a student's LM head, has)
    and ``k`` top-k entries per position, from an engine asked for ``k`` or more (:func:`asked_logprobs`).

    A model's LM head often has padding rows past its tokenizer (Qwen2.5: 151,936 or 152,064 rows
    for 151,665 ids; DeepSeek-V3/R1: 129,280 for 128,815), whose logits are untrained. vLLM samples
    and ranks over every row, so such an id can be drawn (vllm-project/vllm#13175) or enter a top-k.
    A sampled one ends the completion before it, with ``finish_reason``
    :data:`~llmdistill.formats.UNKNOWN_TOKEN` (the build drops it like a truncated one). In a top-k
    the known ids keep their order and log-probs and the next known ones move up, as a teacher that
    ranks only the known ids gives them (:func:`~llmdistill.teacher.topk_logprobs` with ``vocab``).
    Only a position where more ids past ``limit`` rank than the engine gave extra entries for ends
    in ``-inf`` entries on the smallest ids not in its row: the loss reads those as ruled out by the
    teacher (a 1e-30 floor), a small distortion of that one position.
    """
    if completion.finish_reason != "scored" and (completion.token_ids >= limit).any():
        n = int(np.argmax(completion.token_ids >= limit))
        completion = Completion(completion.token_ids[:n], UNKNOWN_TOKEN, completion.topk_ids[:n],
                                completion.topk_logprobs[:n], completion.token_logprobs[:n])
    ids, logprobs = completion.topk_ids, completion.topk_logprobs
    unknown = ids >= limit
    if ids.shape[1] == k and not unknown.any():
        return completion
    order = np.argsort(unknown, axis=1, kind="stable")[:, :k]  # the known ids first, each side in rank order
    ids, logprobs = np.take_along_axis(ids, order, 1), np.take_along_axis(logprobs, order, 1)
    for row in np.flatnonzero((ids >= limit).any(axis=1)):  # more unknown ids than extra entries
        known = ids[row] < limit
        fill = np.setdiff1d(np.arange(min(limit, 2 * k), dtype=ids.dtype), ids[row][known])[:int((~known).sum())]
        ids[row, ~known], logprobs[row, ~known] = fill, -np.inf
    return Completion(completion.token_ids, completion.finish_reason, ids, logprobs, completion.token_logprobs)


def split_columns(ids: np.ndarray, logprobs: np.ndarray, finish_reason: str) -> Completion:
    """``[n, k + 1]`` blocks (column 0 the chosen token) -> a :class:`Completion`."""
    return Completion(ids[:, 0], finish_reason, ids[:, 1:], logprobs[:, 1:], logprobs[:, 0])


class OfflineEngine:
    """An in-process vLLM engine built from the config, fed through its step loop.

    Create it under ``if __name__ == "__main__"`` or from the CLI (vLLM may spawn processes).

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
            max_logprobs=cfg.logprobs_top_k + PADDING_MARGIN if cfg.max_logprobs is None else cfg.max_logprobs,
        )
        if scoring:  # every prompt position must be computed, not read from the cache
            kwargs["enable_prefix_caching"] = False
        kwargs.update(cfg.engine_kwargs_dict)
        self.llm = LLM(**kwargs)
        self.k = cfg.logprobs_top_k
        # extra entries only for a model whose LM head has rows past its tokenizer (see known_ids_only)
        self.asked = asked_logprobs(self.k, self.llm.llm_engine.model_config.max_logprobs) if self._padded() else self.k
        self.cfg = cfg
        self.scoring = scoring
        self.params = self.score_params() if scoring else self.sampling_params()
        self._ids = itertools.count()

    def _padded(self) -> bool:
        """Whether the model's LM head has rows past its tokenizer; unknown (an engine started with
        ``skip_tokenizer_init``) counts as padded: the extra entries are then only cut off."""
        try:
            known = len(self.llm.get_tokenizer())
        except (ValueError, TypeError):
            return True
        return self.llm.llm_engine.model_config.get_vocab_size() > known

    @property
    def max_model_len(self) -> int:
        return self.llm.llm_engine.model_config.max_model_len

    @property
    def max_in_flight(self) -> int:
        """Sequences handed to the engine at once (``max_in_flight``, default 2 x its ``max_num_seqs``)."""
        return self.cfg.max_in_flight or 2 * self.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs

    def sampling_params(self, logprobs: bool = True) -> Any:
        """The SamplingParams of one sample (``logprobs=False``: plain sampling, for the benchmark).

        One sequence per request (``n = 1``): each sample finishes, and is written, on its own.
        Randomness comes from the engine's ``seed``. No per-request seed: vLLM's CPU sampler cannot
        rewind a per-request generator when a prompt's prefill is split across steps, and crashes.
        """
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        cfg = self.cfg
        extra: dict[str, Any] = {}
        if logprobs:
            extra = dict(logprobs=self.asked, flat_logprobs=True, detokenize=False,
                         extra_args={vllm_patch.ROWS_KEY: True})
        return SamplingParams(n=1, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                              output_kind=RequestOutputKind.FINAL_ONLY, **extra)

    def resample(self, cfg: GenerateConfig) -> None:
        """Sample the next requests with ``cfg``'s settings (temperature, top_p, max_tokens): one engine, several phases."""
        self.cfg = cfg
        self.params = self.sampling_params()

    def score_params(self) -> Any:
        """The SamplingParams of one scored pair: the prompt log-probs of one prefill."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(max_tokens=1, prompt_logprobs=self.asked, flat_logprobs=True, detokenize=False,
                              output_kind=RequestOutputKind.FINAL_ONLY)

    def params_for(self, work: Work) -> Any:
        """The SamplingParams of one unit of work (the same for all; a benchmark may vary them)."""
        return self.params

    def stream(self, work: Iterable[Work]) -> Iterator[Finished | None]:
        """Run ``work`` through vLLM's step loop, ``max_in_flight`` at a time; yield each as it finishes.

        Yields:
            ``(work, completion)`` for every finished unit, and ``None`` after each engine step
            (so the caller can flush on time while long sequences run).
        """
        from vllm.inputs import tokens_input

        engine = self.llm.llm_engine
        items, running, window = iter(work), {}, self.max_in_flight
        try:
            while True:
                while len(running) < window and (item := next(items, None)) is not None:
                    request_id = f"llmdistill-{next(self._ids)}"
                    # an engine input (already "rendered" token ids): vLLM does not re-render it per request
                    engine.add_request(request_id, tokens_input(item.token_ids), self.params_for(item))
                    running[request_id] = item
                if not running:
                    return
                for output in engine.step():
                    if output.finished:
                        item = running.pop(output.request_id)
                        yield item, self._completion(output, item)
                yield None
        finally:
            if running:  # the caller stopped early: leave the engine empty for the next stream
                engine.abort_request(list(running))

    def _completion(self, output: Any, item: Work) -> Completion:
        if self.scoring:
            return self._scored(output, item.request)
        out = output.outputs[0]
        ids, logprobs = _completion_arrays(out.logprobs, len(out.token_ids), self.asked)
        if not np.array_equal(ids[:, 0], np.asarray(out.token_ids, dtype=np.int32)):
            raise RuntimeError("vLLM's logprob entries do not start with the sampled tokens")
        return split_columns(ids, logprobs, out.finish_reason or "length")

    def _scored(self, output: Any, req: Request) -> Completion:
        """Top-k at every completion position of one (prompt, completion) pair, from its prompt log-probs."""
        k, pl = self.asked, output.prompt_logprobs
        n_prompt, n = len(req.prompt_token_ids), len(req.completion_token_ids)
        # position 0 has no entries; position p (1..total-1) predicts token p
        skip = (n_prompt - 1) * (k + 1)
        if len(pl.token_ids) != (n_prompt + n - 1) * (k + 1):
            raise RuntimeError(f"vLLM returned {len(pl.token_ids)} prompt-logprob entries for {n_prompt + n - 1} "
                               f"positions, expected k + 1 = {k + 1} per position: this vLLM version lays out "
                               "FlatLogprobs differently than llmdistill expects")
        ids, logprobs = _flat_arrays("prompt-logprob", pl.token_ids[skip:], pl.logprobs[skip:], n, k)
        return split_columns(ids, logprobs, "scored")
