"""Built shards of tiny-world reference traces, for trainer tests and benchmarks, made by ``build``.

The real pipeline gets built shards through ``generate``/``score`` (vLLM) and ``build``. To test
the trainer without an engine, this module writes what ``llmdistill score`` would: generation
shards of the problems' reference completions with the teacher's top-k at every completion
token, from one transformers forward pass per batch (written by
:func:`llmdistill.formats.write_generation_shard`, with the manifest entry build reads). Then
it runs the build stage itself on them, so the trainer's tests consume exactly what ``build``
writes. Without a teacher, the traces go to build as a plain dataset (the SFT-only path).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from llmdistill.formats import GenerationInfo, shard_name, write_generation_shard
from llmdistill.manifest import write_manifest
from llmdistill.tinyworld.recipe import PROMPT_FORMAT, encode_examples
from llmdistill.tinyworld.task import Problem, reference_completion, to_records, write_jsonl


@torch.no_grad()
def teacher_topk(model: torch.nn.Module, docs: Sequence[tuple[list[int], int]], k: int,
                 batch_size: int = 64) -> list[tuple[np.ndarray, np.ndarray]]:
    """The teacher's top-k (ids, log-probs) predicting each completion token of each document.

    Returns:
        Per document, int64 ids and float32 log-probs of shape (n_completion_tokens, k).
    """
    out = []
    for start in range(0, len(docs), batch_size):
        chunk = docs[start:start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, (ids, _) in enumerate(chunk):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            mask[row, :len(ids)] = 1
        logprobs = torch.log_softmax(model(input_ids=input_ids, attention_mask=mask).logits.float(), dim=-1)
        top = logprobs.topk(k, dim=-1)
        for row, (ids, prompt_len) in enumerate(chunk):
            # the logits at t-1 predict the completion token at t
            rows = slice(prompt_len - 1, len(ids) - 1)
            out.append((top.indices[row, rows].numpy(), top.values[row, rows].numpy()))
    return out


def write_scored_generation(out_dir: str | Path, tokenizer: PreTrainedTokenizerBase, problems: Sequence[Problem],
                            teacher_dir: str | Path, k: int) -> Path:
    """Generation shards of the problems' reference traces, scored by the teacher (what ``score`` writes).

    Args:
        out_dir: destination directory (gets one shard and ``manifest.json``).
        tokenizer: the teacher's tokenizer (the tiny world has one tokenizer).
        problems: each becomes one trace.
        teacher_dir: HF checkpoint of the teacher.
        k: top-k entries per completion token.
    """
    started = time.time()
    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32).eval()
    docs = encode_examples(tokenizer, problems)
    topk = teacher_topk(teacher, docs, k)
    prompts = [PROMPT_FORMAT.render(tokenizer, p.question) for p in problems]
    rows = []
    for problem, prompt_text, (ids, prompt_len), (top_ids, top_lps) in zip(problems, prompts, docs, topk, strict=True):
        completion_ids = np.asarray(ids[prompt_len:], dtype=np.int32)
        rows.append({
            "prompt_id": problem.id, "sample_index": 0, "prompt": problem.question, "prompt_text": prompt_text,
            "prompt_token_ids": ids[:prompt_len], "completion": reference_completion(problem),
            "completion_token_ids": completion_ids, "finish_reason": "scored",
            "topk_ids": top_ids.astype(np.int32), "topk_logprobs": top_lps.astype(np.float32),
            # the sampled token's own log-prob is not needed by build; its top-1 stands in
            "token_logprobs": top_lps[:, 0].astype(np.float32), "answer": problem.answer,
        })
    out = Path(out_dir)
    teacher_path = str(Path(teacher_dir).resolve())
    write_generation_shard(rows, out / shard_name(0), k, teacher_path, {"answer": pa.string()}, extra={"stage": "score"})
    info = GenerationInfo(stage="score", teacher=teacher_path, tokenizer=teacher_path, k=k,
                          vocab_size=len(tokenizer), prompt_format=PROMPT_FORMAT)
    write_manifest(out, "score", None, counts={"rows": len(rows)}, started=started, complete=True,
                   generation=info.to_manifest())
    return out


def write_tiny_built(
    out_dir: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[Problem],
    teacher_dir: str | Path | None,
    k: int = 8,
    max_length: int = 128,
    codec_bits: int = 12,
) -> Path:
    """Built shards of the problems' reference traces, written by the build stage.

    Args:
        out_dir: the build's output directory.
        tokenizer: the student tokenizer (also the teacher's: the tiny world has one).
        problems: tiny-world problems; each becomes one document.
        teacher_dir: HF checkpoint of the teacher, or None for an SFT-only (``kd: false``) build.
        k: top-k entries per target token.
        max_length: packed-row capacity.
        codec_bits: top-k log-prob quantisation bits.

    Returns:
        ``out_dir``.
    """
    from llmdistill.builder import run_build
    from llmdistill.config.build import BuildConfig

    with tempfile.TemporaryDirectory(prefix="llmdistill-tiny-") as tmp:
        tokenizer_dir = Path(tmp) / "tokenizer"
        tokenizer.save_pretrained(str(tokenizer_dir))
        if teacher_dir is not None:
            source = write_scored_generation(Path(tmp) / "scored", tokenizer, problems, teacher_dir, k)
        else:
            records = [{**r, "completion": reference_completion(p)}
                       for r, p in zip(to_records(problems), problems, strict=True)]
            source = write_jsonl(Path(tmp) / "traces.jsonl", records)
        run_build(BuildConfig(
            input_path=str(source), student_tokenizer=str(tokenizer_dir), kd=teacher_dir is not None,
            verifier="numeric", answer_column="answer", max_length=max_length, codec_bits=codec_bits,
            dedup_prompts=False, dedup_completions=False, decontam_benchmarks=[], output_dir=str(out_dir),
            overwrite=True,
        ))
    return Path(out_dir)
