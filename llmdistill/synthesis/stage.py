"""``llmdistill synthesize``, top to bottom.

check settings, seeds and benchmarks -> write queries (magpie or seeded) -> evolve them ->
filter (form, length, language, duplicates, contamination) -> the teacher answers each query
``num_answers`` times -> keep the queries whose answers agree -> ``prompts.jsonl`` + report + manifest.

The teacher runs on generate's engines (:func:`llmdistill.generate.stage.make_engine`: an
in-process vLLM engine or the server pool), one engine for every phase; only the sampling
settings change between writing and answering. Every finished query and answer is appended to a
state file of the part (``queries.jsonl``, ``answers.jsonl``) ``flush_every`` at a time, so a
killed run loses at most that many and a re-run does only what is missing.

A query's id is the hash of its text (:func:`llmdistill.prompts.prompt_hash`), the id generate
gives a prompt without an id column: a re-run of generate on a re-synthesized set resumes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from llmdistill.config.base import ConfigError, check_model_path, parse_json_field
from llmdistill.config.generate import EngineConfig, GenerateConfig, ServerConfig
from llmdistill.config.synthesize import SynthesizeConfig
from llmdistill.generate.engines import Work
from llmdistill.generate.inputs import Request
from llmdistill.generate.stage import load_tokenizer, make_engine
from llmdistill.generate.store import check_resumable, decode_completions, part_dir
from llmdistill.log import get_logger
from llmdistill.manifest import write_manifest
from llmdistill.prompts import prompt_hash
from llmdistill.synthesis import filters
from llmdistill.synthesis.prompts import QueryPrompts, few_shot_examples, read_seeds
from llmdistill.synthesis.report import merge_parts, write_outputs

logger = get_logger(__name__)
STAGE = "synthesize"
QUERIES, ANSWERS = "queries.jsonl", "answers.jsonl"


# ---------------------------------------------------------------------------------------
# State files: appended as work finishes, read back on resume


def read_state(path: Path) -> list[dict]:
    """The records of a state file; a last line cut by a kill is ignored (that work is redone)."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number != len(lines):
                raise ConfigError(f"{path} line {number} is corrupt: remove the file to redo that phase") from None
    return records


def append_state(path: Path, records: list[dict]) -> None:
    """Append records and sync them to disk."""
    if not records:
        return
    with path.open("a", encoding="utf-8") as fh:
        fh.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        fh.flush()
        os.fsync(fh.fileno())


# ---------------------------------------------------------------------------------------
# The teacher: generate's engines, one per run, its sampling settings set per phase


def engine_config(cfg: SynthesizeConfig, temperature: float, top_p: float, max_tokens: int, seed: int) -> GenerateConfig:
    """A generate config that drives the engine for one phase: the same teacher and servers, plain sampling.

    Its ``dataset`` is never read (the engines take requests, not files); it names the output.
    """
    shared = {f.name: getattr(cfg, f.name) for f in (*dataclasses.fields(EngineConfig), *dataclasses.fields(ServerConfig))}
    return GenerateConfig(**{**shared, "seed": seed}, dataset=cfg.output_dir, output_dir=cfg.output_dir,
                          logprobs_top_k=0, num_samples=1, temperature=temperature, top_p=top_p,
                          max_tokens=max_tokens)


class Teacher:
    """The engine, started on first use (a finished or resumed-at-the-end part never loads it)."""

    def __init__(self, cfg: SynthesizeConfig, prompts: QueryPrompts, seed: int) -> None:
        self.cfg, self.prompts, self.seed = cfg, prompts, seed
        self.engine: Any = None
        self.special_ids = set(prompts.tokenizer.all_special_ids)

    def run(self, keyed_texts: list[tuple[str, int, str]], temperature: float, top_p: float,
            max_tokens: int) -> Iterator[tuple[str, int, str, str, int]]:
        """Sample one completion per ``(key, sample, prompt text)``.

        Yields:
            ``(key, sample, text, finish_reason, n_tokens)`` as each finishes (a final stop token is neither
            text nor counted).
        """
        if not keyed_texts:
            return
        phase = engine_config(self.cfg, temperature, top_p, max_tokens, self.seed)
        if self.engine is None:
            self.engine = make_engine(phase, scoring=False)
        self.engine.resample(phase)
        ids = self.prompts.encode([t for _, _, t in keyed_texts])
        work = [Work(Request(key, "", text, np.asarray(tokens, dtype=np.int32)), sample)
                for (key, sample, text), tokens in zip(keyed_texts, ids, strict=True)]
        for finished in self.engine.stream(work):
            if finished is None:
                continue
            item, completion = finished
            text = decode_completions(self.prompts.tokenizer, [completion])[0]
            tokens = completion.token_ids
            ended = completion.finish_reason == "stop" and len(tokens) and int(tokens[-1]) in self.special_ids
            yield item.request.prompt_id, item.sample_index, text, completion.finish_reason, len(tokens) - int(ended)


def _stream_to(path: Path, records: Iterator[dict], every: int) -> int:
    buffer, count = [], 0
    for record in records:
        buffer.append(record)
        count += 1
        if len(buffer) >= every:
            append_state(path, buffer)
            buffer = []
    append_state(path, buffer)
    return count


# ---------------------------------------------------------------------------------------
# Phases


def write_queries(cfg: SynthesizeConfig, teacher: Teacher, directory: Path, slots: list[int],
                  seeds: list[str] | None) -> dict[int, dict]:
    """Write (round 0) and evolve (rounds 1..evolve_steps) the part's queries; return the last round per slot."""
    temperature, top_p = cfg.sampling
    state = {(r["slot"], r["round"]): r for r in read_state(directory / QUERIES)}
    for round_ in range(cfg.evolve_steps + 1):
        todo = []
        for slot in slots:
            if (slot, round_) in state:
                continue
            if round_ == 0:
                text = (teacher.prompts.magpie() if cfg.mode == "magpie" else
                        teacher.prompts.seeded(few_shot_examples(seeds, cfg.num_examples, slot, cfg.seed)))
            else:
                previous = state[(slot, round_ - 1)]
                if previous["finish_reason"] == "length" or not previous["text"].strip():
                    continue  # nothing to evolve: the slot is dropped as malformed
                text = teacher.prompts.evolve(previous["text"].strip())
            todo.append((str(slot), 0, text))
        if todo:
            logger.info("synthesize: %s %d queries", "writing" if round_ == 0 else f"evolving (round {round_})",
                        len(todo))
        records = ({"slot": int(key), "round": round_, "text": text, "finish_reason": reason, "tokens": n}
                   for key, _, text, reason, n in teacher.run(todo, temperature, top_p, cfg.max_query_tokens))
        _stream_to(directory / QUERIES, records, cfg.flush_every)
        state = {(r["slot"], r["round"]): r for r in read_state(directory / QUERIES)}
    return {slot: max((r for (s, _), r in state.items() if s == slot), key=lambda r: r["round"]) for slot in slots}


def filter_queries(cfg: SynthesizeConfig, queries: list[dict], special_tokens: list[str],
                   index: Any) -> tuple[list[str], dict[str, Any]]:
    """The cheap filters in order (form, length, language, duplicates, contamination).

    Returns:
        The surviving query texts (one per id), and the count each filter dropped.
    """
    counts: dict[str, Any] = {"written": len(queries)}
    texts = [q["text"].strip() for q in queries]
    alive = np.asarray([filters.well_formed_query(q["text"], q["finish_reason"], special_tokens)
                        and q["round"] == cfg.evolve_steps for q in queries], dtype=bool)
    counts["dropped_malformed"] = int((~alive).sum())

    def apply(name: str, keep: np.ndarray) -> None:
        nonlocal alive
        counts[f"dropped_{name}"] = int((alive & ~keep).sum())
        alive &= keep

    apply("length", filters.query_length_mask([q["tokens"] for q in queries], cfg.min_query_tokens))
    apply("language", filters.language_mask(texts, cfg.script, cfg.min_script_fraction))
    live = np.flatnonzero(alive)
    unique = filters.unique_mask([texts[i] for i in live], cfg.near_dedup, cfg.dedup_threshold, cfg.dedup_ngram,
                                 cfg.minhash_num_perm)
    apply("duplicate", _scatter(live, unique, len(texts)))
    live = np.flatnonzero(alive)
    clean, hits = filters.clean_mask([texts[i] for i in live], index) if index else (np.ones(len(live), bool), {})
    apply("contaminated", _scatter(live, clean, len(texts)))
    counts["contaminated_by"] = dict(hits)
    return [texts[i] for i in np.flatnonzero(alive)], counts


def _scatter(positions: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """A full-length keep-mask: ``values`` at ``positions``, True elsewhere (those are already dropped)."""
    out = np.ones(n, dtype=bool)
    out[positions] = values
    return out


def solve_queries(cfg: SynthesizeConfig, teacher: Teacher, directory: Path,
                  texts: list[str]) -> tuple[list[dict], dict[str, Any]]:
    """The solvability filter: ``num_answers`` answers per query, kept when the most common one agrees enough.

    Returns:
        Output rows ``{id, prompt, answer, agreement}`` (no answer column with ``min_agreement: 0``), and counts.
    """
    if cfg.min_agreement == 0:
        return [{"id": prompt_hash(t), "prompt": t} for t in texts], {"dropped_unsolvable": 0}
    by_id = {prompt_hash(t): t for t in texts}
    done = {(r["id"], r["sample"]) for r in read_state(directory / ANSWERS)}
    todo = [(qid, s, teacher.prompts.answer(text)) for qid, text in by_id.items() for s in range(cfg.num_answers)
            if (qid, s) not in done]
    if todo:
        logger.info("synthesize: %d answers to %d queries", len(todo), len(by_id))
    records = ({"id": qid, "sample": s, "text": text, "finish_reason": reason}
               for qid, s, text, reason, _ in teacher.run(todo, cfg.answer_temperature, cfg.answer_top_p,
                                                          cfg.answer_max_tokens))
    _stream_to(directory / ANSWERS, records, cfg.flush_every)
    answers: dict[str, dict[int, dict]] = {}
    for r in read_state(directory / ANSWERS):
        answers.setdefault(r["id"], {})[r["sample"]] = r
    rows, agreement = [], Counter()
    for qid, text in by_id.items():
        samples = [answers[qid][s] for s in range(cfg.num_answers)]
        answer, share = filters.voted_answer(cfg.checker, [a["text"] for a in samples],
                                             [a["finish_reason"] for a in samples])
        agreement[round(share, 2)] += 1
        if answer is not None and share >= cfg.min_agreement:
            rows.append({"id": qid, "prompt": text, "answer": answer, "agreement": round(share, 4)})
    return rows, {"dropped_unsolvable": len(by_id) - len(rows),
                  "agreement_histogram": {str(k): v for k, v in sorted(agreement.items())}}


# ---------------------------------------------------------------------------------------
# The stage


def prepare(cfg: SynthesizeConfig) -> tuple[Path, QueryPrompts, list[str] | None, Any]:
    """Every check that needs no engine: output, teacher tokenizer, templates, seeds, benchmarks."""
    from llmdistill.builder.decontam import build_index

    index, count = cfg.shard_index_count
    directory = part_dir(cfg.output_dir, index, count)
    check_resumable(directory, cfg, STAGE)
    check_model_path("model", cfg.model)
    if cfg.tokenizer:
        check_model_path("tokenizer", cfg.tokenizer)
    prompts = QueryPrompts(load_tokenizer(cfg), cfg.system_prompt, cfg.seeded_template, cfg.evolve_template,
                           cfg.answer_template)
    if cfg.mode == "magpie":
        prompts.magpie()  # fails now on a template that cannot be cut at the user turn
    seeds = read_seeds(cfg.seed_file) if cfg.mode == "seeded" else None
    decontam = None
    if cfg.decontam_benchmarks or cfg.decontam_extra_file:
        decontam = build_index(cfg, parse_json_field("decontam_data_paths", cfg.decontam_data_paths))
    return directory, prompts, seeds, decontam


def run_synthesize(cfg: SynthesizeConfig) -> dict[str, Any]:
    """``llmdistill synthesize``: write, filter and answer queries; ``prompts.jsonl`` is generate's input.

    Returns:
        The manifest written to the part's directory (or the merged one with ``merge``).
    """
    if cfg.merge:
        return merge_parts(cfg)
    started = time.time()
    directory, prompts, seeds, decontam = prepare(cfg)
    index, count = cfg.shard_index_count
    write_manifest(directory, STAGE, cfg, inputs={"model": cfg.model}, started=started, complete=False,
                   shard={"index": index, "count": count})

    # Write and evolve this part's queries: slots i, i + N, ...
    slots = list(range(index, cfg.num_queries, count))
    done_before = len(read_state(directory / QUERIES)) + len(read_state(directory / ANSWERS))
    # a resumed run must not re-draw the first run's samples: its engine seed moves on with the work done
    teacher = Teacher(cfg, prompts, seed=cfg.seed + 7919 * index + done_before)
    queries = list(write_queries(cfg, teacher, directory, slots, seeds).values())

    # Filter, then answer what is left
    special = [t for t in prompts.tokenizer.all_special_tokens if t]
    texts, counts = filter_queries(cfg, queries, special, decontam)
    rows, solved = solve_queries(cfg, teacher, directory, texts)
    counts.update(solved)
    counts["kept"] = len(rows)
    return write_outputs(directory, cfg, rows, counts, started)


def synthesis_plan(cfg: SynthesizeConfig) -> dict[str, Any]:
    """What ``--dry_run`` prints: this part's requests and token bounds per phase, and where the teacher runs."""
    if cfg.merge:
        return {"merge": f"parts of {cfg.output_dir} -> {cfg.output_dir}/prompts.jsonl"}
    index, count = cfg.shard_index_count
    queries = len(range(index, cfg.num_queries, count))
    writing = queries * (1 + cfg.evolve_steps)
    answers = queries * cfg.num_answers if cfg.min_agreement > 0 else 0
    temperature, top_p = cfg.sampling
    plan: dict[str, Any] = {
        "mode": cfg.mode, "shard": cfg.shard, "queries (this part)": queries,
        "query sampling (temperature, top_p)": [temperature, top_p],
        "writing requests (incl. evolve steps)": writing,
        "answer requests (upper bound, before filters)": answers,
        "generated tokens (upper bound)": f"{writing * cfg.max_query_tokens + answers * cfg.answer_max_tokens:.3g}",
        "filters": ["malformed", "length", "language", "duplicate", "contaminated"]
                   + (["unsolvable"] if cfg.min_agreement > 0 else []),
        "decontaminate against": cfg.decontam_benchmarks,
        "generate reads": {"dataset": f"{cfg.output_dir}/prompts.jsonl", "id_column": "id",
                           "passthrough_columns": ["answer"]},
    }
    if cfg.backend == "server":
        plan["GPUs"] = f"held by {len(cfg.server_urls)} external vLLM server(s)"
    else:
        plan["GPUs per job"] = cfg.tensor_parallel_size * cfg.pipeline_parallel_size
    return plan
