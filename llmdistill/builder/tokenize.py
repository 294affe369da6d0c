"""Step 5: the student's tokens, its loss mask, and the alignment of the teacher's top-k.

A document is ``student_chat_template(prompt) + completion_ids``; only the completion tokens
are targets. For token-level KD the completion ids are exactly the teacher's sampled ids, so
the teacher's top-k row ``i`` is the distribution that predicted completion token ``i``: this
only means something when both models share one tokenizer, which is checked on the
vocabulary and merges (:func:`llmdistill.formats.tokenizer_fingerprint`), not on names.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from llmdistill.builder.traces import Traces
from llmdistill.config.base import ConfigError, UserError
from llmdistill.config.build import PackConfig
from llmdistill.formats import tokenizer_fingerprint
from llmdistill.log import get_logger
from llmdistill.prompts import PromptFormat, prompt_messages

logger = get_logger(__name__)


class TokenizerMismatchError(UserError):
    """Teacher and student tokenizers differ where token-level KD needs them to be equal."""


@dataclass
class Document:
    """One training document before packing.

    Attributes:
        doc_id: ``prompt_id/sample_index`` (``#part`` appended for pieces of a split trace).
        input_ids: int32 (length,): prompt then completion tokens.
        loss_mask: int8 (length,): 1 on completion tokens (the targets).
        row: index of the trace in the source (to find its teacher top-k).
        target_rows: int64 (sum(loss_mask),): for each target, in order, its row in the
            trace's teacher top-k block; None without teacher signal.
    """

    doc_id: str
    input_ids: np.ndarray
    loss_mask: np.ndarray
    row: int
    target_rows: np.ndarray | None

    def __len__(self) -> int:
        return len(self.input_ids)


def load_tokenizer(path: str, what: str) -> Any:
    """``AutoTokenizer.from_pretrained`` with an error that says which tokenizer and how to fix it."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"could not load the {what} tokenizer from '{path}': {err}. Set {what}_tokenizer "
                          "to a local directory holding tokenizer files.") from err


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


def make_documents(traces: Traces, tokenizer: Any, cfg: PackConfig, fmt: PromptFormat,
                   teacher_tokenizer: str | None) -> tuple[list[Document], int]:
    """Tokenise every trace for the student.

    Args:
        traces: the surviving traces.
        tokenizer: the student tokenizer.
        cfg: the pack config (kd, teacher tokenizer, prompt-mismatch policy).
        fmt: system prompt and instruction template of the prompts.
        teacher_tokenizer: path of the teacher's tokenizer (generation input).

    Returns:
        The documents, in trace order, and the number of prompts whose student tokens differ
        from the teacher's (0 unless ``allow_prompt_mismatch``).

    Raises:
        TokenizerMismatchError: kd with different tokenizers.
        ValueError: the student's prompt tokens differ from the teacher's (naming the row).
    """
    same = traces.kind == "generation" and teacher_ids_usable(tokenizer, teacher_tokenizer, cfg.kd)
    rows = np.asarray(traces.column("row"), dtype=np.int64)
    prompts = traces.column("prompt")
    unique = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
    encoded = student_prompt_ids(list(unique), tokenizer, fmt)
    prompt_ids = [np.asarray(encoded[unique[p]], dtype=np.int32) for p in prompts]
    if traces.kind == "generation" and not same:  # other tokenizer: the student reads the text again
        completions = traces.column("completion")
        retok = tokenizer(completions, add_special_tokens=False)["input_ids"]
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        stops = [r != "length" for r in traces.column("finish_reason")]
        completion_ids = [np.asarray(ids + (eos if stop else []), dtype=np.int32) for ids, stop in zip(retok, stops, strict=True)]
    else:
        completion_ids = [traces.completion_ids[r] for r in rows]
    mismatches = _check_prompts(traces, prompt_ids, rows, cfg) if same else 0
    doc_ids = [f"{p}/{s}" for p, s in zip(traces.column("prompt_id"), traces.column("sample_index"), strict=True)]
    docs = []
    for doc_id, row, p_ids, c_ids in zip(doc_ids, rows.tolist(), prompt_ids, completion_ids, strict=True):
        mask = np.concatenate([np.zeros(len(p_ids), np.int8), np.ones(len(c_ids), np.int8)])
        targets = np.arange(len(c_ids), dtype=np.int64) if cfg.kd else None
        docs.append(Document(doc_id, np.concatenate([p_ids, c_ids]).astype(np.int32), mask, row, targets))
    return docs, mismatches


def _check_prompts(traces: Traces, prompt_ids: list[np.ndarray], rows: np.ndarray, cfg: PackConfig) -> int:
    """Compare the student's prompt tokens with the teacher's; fail (or count) mismatches."""
    assert traces.prompt_ids is not None
    bad = [i for i, (ids, r) in enumerate(zip(prompt_ids, rows.tolist(), strict=True))
           if not np.array_equal(ids, traces.prompt_ids[r])]
    if bad and not cfg.allow_prompt_mismatch:
        i = bad[0]
        raise ValueError(
            f"{len(bad)} trace(s) get other prompt tokens from the student's chat template than the teacher saw "
            f"(first: prompt_id {traces.column('prompt_id')[i]}, sample {traces.column('sample_index')[i]}: "
            f"student {prompt_ids[i][:12].tolist()}..., teacher {traces.prompt_ids[rows[i]][:12].tolist()}...). "
            "Give the generation's system_prompt / instruction_template and chat template, or set "
            "allow_prompt_mismatch: true to train on the student's template anyway."
        )
    if bad:
        logger.warning("%d trace(s): the student's prompt tokens differ from the teacher's", len(bad))
    return len(bad)
