"""Step 5: the student's tokens, its loss mask, and the alignment of the teacher's top-k.

A document is ``student_chat_template(prompt) + completion_ids``; only the completion tokens
are targets. For token-level KD the completion ids are exactly the teacher's sampled ids, so
the teacher's top-k row ``i`` is the distribution that predicted completion token ``i``: this
only means something when both models share one tokenizer, which is checked on the
vocabulary and merges (:func:`llmdistill.formats.tokenizer_fingerprint`), not on names.
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa

from llmdistill.builder.traces import Ragged
from llmdistill.config.base import ConfigError, UserError
from llmdistill.config.build import PackConfig
from llmdistill.formats import UNFINISHED, tokenizer_fingerprint
from llmdistill.log import get_logger
from llmdistill.prompts import PromptFormat, prompt_messages

logger = get_logger(__name__)


class TokenizerMismatchError(UserError):
    """Teacher and student tokenizers differ where token-level KD needs them to be equal."""


class PromptMismatchError(UserError):
    """The student's chat template gives other prompt tokens than the teacher saw."""


@dataclass
class Document:
    """One training document before packing.

    Attributes:
        doc_id: ``prompt_id/sample_index`` (``#part`` appended for pieces of a split trace).
        input_ids: int32 (length,): prompt then completion tokens.
        loss_mask: int8 (length,): 1 on completion tokens (the targets).
        row: index of the trace in its part.
        target_rows: int64 (sum(loss_mask),): for each target, in order, its row in the
            trace's teacher top-k block; None without teacher signal.
        topk_ids: int32 (n_tokens, k): the trace's teacher top-k ids (None without teacher signal).
        topk_logprobs: float32 (n_tokens, k): their log-probs.
    """

    doc_id: str
    input_ids: np.ndarray
    loss_mask: np.ndarray
    row: int
    target_rows: np.ndarray | None
    topk_ids: np.ndarray | None = None
    topk_logprobs: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    def topk(self) -> tuple[np.ndarray, np.ndarray]:
        """The teacher top-k rows of this document's targets, in order: ids and log-probs (n_targets, k)."""
        assert self.topk_ids is not None and self.topk_logprobs is not None and self.target_rows is not None
        return self.topk_ids[self.target_rows], self.topk_logprobs[self.target_rows]


def load_tokenizer(path: str, what: str) -> Any:
    """``AutoTokenizer.from_pretrained`` with an error that says which tokenizer and how to fix it."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"could not load the {what} tokenizer from '{path}': {err}. Set {what}_tokenizer "
                          "to a local directory holding tokenizer files.") from err


_shipped: dict[str, Any] = {}  # a worker's unpickled tokenizers, by content hash


class ShippedTokenizer:
    """The driver's loaded student tokenizer, sent to the build's workers inside their shared context.

    Workers unpickle the very object :func:`load_tokenizer` made, once per process: about 0.8 s
    at 152k ids (mostly importing transformers), where ``AutoTokenizer.from_pretrained`` takes
    about 4.5 s, as its imports pull in the model classes and torch. That was paid by every
    worker of every phase, i.e. at every actor start. The pickle (about 2.4 MB at 152k ids) goes
    into Ray's object store once per phase.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._blob = pickle.dumps(tokenizer)
        self._key = hashlib.sha1(self._blob).hexdigest()

    def __getstate__(self) -> dict[str, Any]:
        return {"_blob": self._blob, "_key": self._key}

    def get(self) -> Any:
        """The tokenizer, unpickled on the first call in this process."""
        if self._key not in _shipped:
            if len(_shipped) >= 4:  # a long-lived worker (or a test process) that saw many builds
                _shipped.pop(next(iter(_shipped)))
            _shipped[self._key] = pickle.loads(self._blob)
        return _shipped[self._key]


def teacher_ids_usable(student: Any, teacher_path: str | None, kd: bool) -> bool:
    """Whether the teacher's completion ids can be used as the student's tokens.

    Returns:
        True when both tokenizers are identical (fingerprint of vocab + merges).

    Raises:
        TokenizerMismatchError: ``kd`` is on and the tokenizers differ (or the teacher's is unknown).
    """
    if teacher_path is None:
        if kd:
            raise ConfigError("kd: true needs the teacher's tokenizer: set teacher_tokenizer (the generation "
                              "shards do not name a loadable teacher)")
        return False
    try:
        teacher = load_tokenizer(teacher_path, "teacher")
    except ConfigError:
        if kd:
            raise
        logger.warning("teacher tokenizer %s not loadable: re-tokenising completions with the student's", teacher_path)
        return False
    same = tokenizer_fingerprint(teacher) == tokenizer_fingerprint(student)
    if kd and not same:
        raise TokenizerMismatchError(
            f"token-level KD needs one tokenizer, but the teacher's ({teacher_path}, fingerprint "
            f"{tokenizer_fingerprint(teacher)}) and the student's (fingerprint {tokenizer_fingerprint(student)}) "
            "differ in vocabulary or merges, so a teacher top-k row does not index the student's vocabulary. "
            "Either re-score the traces with a teacher that shares the student's tokenizer (`llmdistill score`), "
            "or build SFT-only with `kd: false`."
        )
    return same


def resolve_prompt_format(cfg: PackConfig, recorded: PromptFormat | None) -> PromptFormat:
    """The student's prompt format: the one the teacher saw (``recorded``), unless the config sets a field."""
    base = recorded or PromptFormat()
    configured = PromptFormat.from_settings(cfg.system_prompt, cfg.instruction_template)
    return replace(base,
                   system_prompt=base.system_prompt if cfg.system_prompt is None else configured.system_prompt,
                   instruction_template=(base.instruction_template if cfg.instruction_template is None
                                         else configured.instruction_template))


def student_prompt_ids(prompts: list[str], tokenizer: Any, fmt: PromptFormat) -> list[list[int]]:
    """Token ids of stored prompts as the student reads them (generation prompt included)."""
    return fmt.token_ids(tokenizer, [prompt_messages(p) for p in prompts])


@dataclass(frozen=True)
class DocumentSpec:
    """How a part's traces become documents (decided once, on the driver).

    Attributes:
        kind: ``generation`` or ``dataset``.
        same_tokenizer: the teacher's completion ids are the student's tokens (checked on the
            tokenizers' fingerprints); otherwise the student re-tokenises the completion text.
        fmt: the student's prompt format.
        k: teacher top-k entries per position.
        compare_prompts: the student's prompt tokens must equal the teacher's. False for SDFT
            rewrites: the model read the prompt with a reference answer, the student reads the prompt.
    """

    kind: str
    same_tokenizer: bool
    fmt: PromptFormat
    k: int
    compare_prompts: bool = True

    def columns(self, kd: bool) -> list[str]:
        """The columns a part reads to make its documents."""
        cols = ["prompt_id", "sample_index", "prompt"]
        if self.kind == "generation" and self.same_tokenizer:
            cols += ["prompt_token_ids", "completion_token_ids"]
        else:
            cols += ["completion", "finish_reason"]
        return cols + (["topk_ids", "topk_logprobs"] if kd else [])


def batch_documents(batch: pa.RecordBatch, rows: np.ndarray, tokenizer: Any, cfg: PackConfig, spec: DocumentSpec,
                    prompt_cache: dict[str, np.ndarray]) -> tuple[list[Document], int]:
    """Tokenise the traces of one batch for the student.

    Args:
        batch: the traces (the columns of :meth:`DocumentSpec.columns`).
        rows: int (batch rows,): each trace's row in its part.
        tokenizer: the student tokenizer.
        cfg: the pack config (kd, prompt-mismatch policy).
        spec: how traces become documents.
        prompt_cache: the student's prompt ids by prompt text, shared by the batches of a part.

    Returns:
        The documents, in trace order, and the number of prompts whose student tokens differ from
        the teacher's (0 unless ``allow_prompt_mismatch``).

    Raises:
        PromptMismatchError: the student's prompt tokens differ from the teacher's (naming the trace).
    """
    prompts = batch.column("prompt").to_pylist()
    new = [p for p in dict.fromkeys(prompts) if p not in prompt_cache]
    for text, ids in zip(new, student_prompt_ids(new, tokenizer, spec.fmt), strict=True):
        prompt_cache[text] = np.asarray(ids, dtype=np.int32)
    prompt_ids = [prompt_cache[p] for p in prompts]
    if spec.kind == "generation" and spec.same_tokenizer:
        completions = Ragged.from_arrow(batch.column("completion_token_ids"))
        completion_ids = [completions[i] for i in range(batch.num_rows)]
    else:  # a plain dataset, or another tokenizer: the student reads the text (EOS when the teacher stopped)
        retok = tokenizer(batch.column("completion").to_pylist(), add_special_tokens=False)["input_ids"]
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        stops = [r not in UNFINISHED for r in batch.column("finish_reason").to_pylist()]
        completion_ids = [np.asarray(ids + (eos if stop else []), dtype=np.int32)
                          for ids, stop in zip(retok, stops, strict=True)]
    doc_ids = [f"{p}/{s}" for p, s in zip(batch.column("prompt_id").to_pylist(),
                                          batch.column("sample_index").to_pylist(), strict=True)]
    compare = spec.kind == "generation" and spec.same_tokenizer and spec.compare_prompts
    mismatches = _check_prompts(batch, prompt_ids, doc_ids, cfg) if compare else 0
    topk = _topk_rows(batch, spec.k) if cfg.kd else None
    docs = []
    for i, (doc_id, p_ids, c_ids) in enumerate(zip(doc_ids, prompt_ids, completion_ids, strict=True)):
        mask = np.concatenate([np.zeros(len(p_ids), np.int8), np.ones(len(c_ids), np.int8)])
        ids, lps = (topk[0][i], topk[1][i]) if topk is not None else (None, None)
        targets = np.arange(len(c_ids), dtype=np.int64) if cfg.kd else None
        docs.append(Document(doc_id, np.concatenate([p_ids, c_ids]).astype(np.int32), mask, int(rows[i]), targets,
                             ids, lps))
    return docs, mismatches


def _topk_rows(batch: pa.RecordBatch, k: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per trace, its teacher top-k as (n_tokens, k) ids and log-probs."""
    ids, lps = Ragged.from_arrow(batch.column("topk_ids")), Ragged.from_arrow(batch.column("topk_logprobs"))
    return ([ids[i].reshape(-1, k) for i in range(len(ids))], [lps[i].reshape(-1, k) for i in range(len(lps))])


def _check_prompts(batch: pa.RecordBatch, prompt_ids: list[np.ndarray], doc_ids: list[str], cfg: PackConfig) -> int:
    """Compare the student's prompt tokens with the teacher's; fail (or count) mismatches."""
    teacher = Ragged.from_arrow(batch.column("prompt_token_ids"))
    bad = [i for i, ids in enumerate(prompt_ids) if not np.array_equal(ids, teacher[i])]
    if bad and not cfg.allow_prompt_mismatch:
        i = bad[0]
        pid, _, sample = doc_ids[i].rpartition("/")
        raise PromptMismatchError(
            f"{len(bad)} trace(s) get other prompt tokens from the student's chat template than the teacher saw "
            f"(first: prompt_id {pid}, sample {sample}: "
            f"student {prompt_ids[i][:12].tolist()}..., teacher {teacher[i][:12].tolist()}...). "
            "Give the generation's system_prompt / instruction_template and chat template, or set "
            "allow_prompt_mismatch: true to train on the student's template anyway."
        )
    if bad:
        logger.warning("%d trace(s): the student's prompt tokens differ from the teacher's", len(bad))
    return len(bad)
