"""Output side of ``generate`` and ``score``: shard files, resume, manifests, merging parts.

Layout of ``output_dir``::

    manifest.json            one part (shard 0/1), or the merged manifest of N parts
    part-000000.parquet ...  generation shards (the completions finished in one flush interval), shard 0/1
    shard-00003-of-00008/    part 3 of 8 (``--shard 3/8``): its own part-*.parquet + manifest.json

Every shard is written under a temporary name, fsync'd and renamed, so a killed run leaves
only whole shards; a re-run reads the (prompt id, sample index) pairs they hold and skips them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from llmdistill.config.base import ConfigError, config_to_dict
from llmdistill.config.generate import OPERATIONAL_FIELDS, GenerateConfig, ScoreConfig
from llmdistill.formats import (
    GENERATION_INFO_KEY,
    GENERATION_SCHEMA,
    GENERATION_SCHEMA_VERSION,
    SHARD_GLOB,
    GenerationInfo,
    generation_counts,
    shard_name,
    write_generation_shard,
)
from llmdistill.generate.engines import Completion, Finished
from llmdistill.generate.inputs import InputError
from llmdistill.manifest import MANIFEST, read_manifest, write_json_atomic, write_manifest

PART_DIR = re.compile(r"shard-(\d+)-of-(\d+)")
LOGPROBS_NOTE = ("raw log-probs of the teacher at temperature 1 (before temperature and top-p), "
                 "whatever the sampling temperature")


def next_shard_index(directory: str | Path) -> int:
    """The index after the last finished shard directly in ``directory`` (0 when there is none)."""
    directory = Path(directory)
    numbers = [int(p.stem.split("-")[1]) for p in directory.glob(SHARD_GLOB)] if directory.is_dir() else []
    return max(numbers, default=-1) + 1


def part_dir(output_dir: str | Path, index: int, count: int) -> Path:
    """Where part ``index`` of ``count`` writes: ``output_dir`` itself when there is one part."""
    return Path(output_dir) if count == 1 else Path(output_dir) / f"shard-{index:05d}-of-{count:05d}"


def _output_fields(config: dict[str, Any], ignore: frozenset[str] = frozenset()) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in OPERATIONAL_FIELDS and k not in ignore}


def config_differences(old: dict[str, Any], new: dict[str, Any], ignore: frozenset[str] = frozenset()) -> list[str]:
    """``field: old -> new`` for every output-affecting field that differs."""
    a, b = _output_fields(old, ignore), _output_fields(new, ignore)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def check_resumable(directory: Path, cfg: Any, stage: str) -> None:
    """Refuse to add to a directory written by another stage or with other output-affecting settings.

    ``cfg`` is the stage's config (generate, score or synthesize).

    Raises:
        ConfigError: naming each differing field.
    """
    if not (directory / MANIFEST).is_file():
        if directory.is_dir() and any(directory.glob(SHARD_GLOB)):
            raise ConfigError(f"{directory} holds shards but no {MANIFEST}: it was not written by this stage; "
                              f"use another output_dir")
        return
    old = read_manifest(directory)
    if old.get("stage") != stage:
        raise ConfigError(f"{directory} holds '{old.get('stage')}' output, not '{stage}': use another output_dir")
    diffs = config_differences(old.get("config") or {}, config_to_dict(cfg))
    if diffs:
        raise ConfigError(f"cannot resume {directory}: it was written with other settings ({'; '.join(diffs)}). "
                          f"Restore them to resume, or use a new output_dir")


def remove_stale_temp_files(directory: Path) -> None:
    """Delete temporary shard files a killed run left behind (never read: their names start with '.')."""
    if directory.is_dir():
        for path in directory.glob(".part-*.parquet.tmp-*"):
            path.unlink(missing_ok=True)


def decode_completions(tokenizer: Any, completions: list[Completion]) -> list[str]:
    """Completion texts in one ``batch_decode``; a final stop token (EOS) is not part of the text."""
    special = set(tokenizer.all_special_ids)
    ids = []
    for c in completions:
        tokens = c.token_ids
        if c.finish_reason == "stop" and len(tokens) and int(tokens[-1]) in special:
            tokens = tokens[:-1]
        ids.append(tokens.tolist())
    return tokenizer.batch_decode(ids, skip_special_tokens=False)


def shard_rows(finished: list[Finished], texts: list[str] | None) -> list[dict[str, Any]]:
    """Generation rows (see :mod:`llmdistill.formats`) of finished work.

    Args:
        finished: ``(work, completion)`` pairs.
        texts: the completion texts in the same order, or ``None`` to use ``request.completion`` (score).
    """
    rows = []
    for i, (work, comp) in enumerate(finished):
        req = work.request
        rows.append({
            "prompt_id": req.prompt_id, "sample_index": work.sample_index, "prompt": req.prompt,
            "prompt_text": req.prompt_text, "prompt_token_ids": req.prompt_token_ids,
            "completion": req.completion if texts is None else texts[i],
            "completion_token_ids": comp.token_ids, "finish_reason": comp.finish_reason,
            "topk_ids": comp.topk_ids, "topk_logprobs": comp.topk_logprobs,
            "token_logprobs": comp.token_logprobs, **req.passthrough,
        })
    return rows


class ShardWriter:
    """Writes generation shards ``part-NNNNNN.parquet`` in order, in a background thread.

    :meth:`submit` hands over the completions of one flush; the thread turns them into rows
    (``to_rows``: detokenization, Arrow conversion), compresses and writes them atomically
    while the engine keeps generating. At most one shard is being written: a second
    :meth:`submit` waits for the first (so a slow disk slows the run instead of filling
    memory), and a failed write stops the run there.

    Args:
        directory: the part's directory.
        to_rows: finished work -> generation rows.
        info: the run's :class:`GenerationInfo` (k, teacher, stage).
        passthrough: Arrow types of the passthrough columns.
    """

    def __init__(self, directory: Path, to_rows: Callable[[list[Finished]], list[dict[str, Any]]],
                 info: GenerationInfo, passthrough: dict[str, Any]):
        self.directory, self.to_rows, self.info, self.passthrough = directory, to_rows, info, passthrough
        self.index = next_shard_index(directory)
        self.written = 0
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self._pending: Future | None = None

    def submit(self, finished: list[Finished]) -> None:
        """Write ``finished`` as the next shard (returns once the previous shard is on disk)."""
        self.wait()
        path = self.directory / shard_name(self.index)
        self.index += 1
        self._pending = self._thread.submit(self._write, finished, path)

    def _write(self, finished: list[Finished], path: Path) -> None:
        rows = self.to_rows(finished)
        write_generation_shard(rows, path, self.info.k, self.info.teacher, self.passthrough,
                               extra={"stage": self.info.stage})
        self.written += len(rows)

    def wait(self) -> None:
        """Block until the shard being written is on disk (re-raising its error)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.wait()  # what finished before an error is still written
        finally:
            self._thread.shutdown()


def write_part_manifest(
    directory: Path, cfg: GenerateConfig | ScoreConfig, info: GenerationInfo, counts: dict[str, Any],
    started: float, complete: bool,
) -> dict[str, Any]:
    """The manifest of one part: written before the engine starts (incomplete) and at the end."""
    index, count = cfg.shard_index_count
    return write_manifest(
        directory, info.stage, cfg, inputs={"dataset": cfg.dataset, "model": cfg.model},
        counts={**counts, **(generation_counts(directory) if directory.is_dir() else {})}, started=started,
        complete=complete, shard={"index": index, "count": count},
        logprobs={"k": cfg.logprobs_top_k, "temperature": 1.0, "kind": "raw", "note": LOGPROBS_NOTE},
        schema={"name": GENERATION_SCHEMA, "version": GENERATION_SCHEMA_VERSION},
        **{GENERATION_INFO_KEY: info.to_manifest()},
    )


def _sum_counts(parts: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {}
    for counts in parts:
        for key, value in counts.items():
            if isinstance(value, dict):
                total[key] = _sum_counts([total.get(key, {}), value])
            elif isinstance(value, int | float):
                total[key] = total.get(key, 0) + value
    return total


def merge_shards(output_dir: str | Path) -> dict[str, Any]:
    """Check that all N parts of a ``--shard i/N`` run are complete and write the merged manifest.

    The parts' shards stay where they are: ``build`` (and :func:`llmdistill.formats.iter_generations`)
    read ``output_dir`` recursively.

    Raises:
        InputError: no parts, parts of different N, or a part that is missing or unfinished.
        ConfigError: parts written with different output-affecting settings.
    """
    output_dir = Path(output_dir)
    found = {tuple(map(int, m.groups())): p for p in output_dir.glob("shard-*-of-*")
             if p.is_dir() and (m := PART_DIR.fullmatch(p.name))}
    counts = {n for _, n in found}
    if len(counts) != 1:
        raise InputError(f"{output_dir} holds parts of {sorted(counts) or 'no'} shard count(s): expected the "
                         f"shard-i-of-N directories of one run")
    n = counts.pop()
    manifests = {}
    for i in range(n):
        path = found.get((i, n))
        if path is not None and (path / MANIFEST).is_file():
            manifests[i] = read_manifest(path)
    missing = [i for i in range(n) if not manifests.get(i, {}).get("complete")]
    if missing:
        raise InputError(f"cannot merge {output_dir}: part(s) {missing} of {n} are missing or unfinished; "
                         f"run them with --shard i/{n} first")
    first = manifests[0]
    for i in range(1, n):
        diffs = config_differences(first["config"], manifests[i]["config"], ignore=frozenset({"shard"}))
        if diffs:
            raise ConfigError(f"part {i} of {output_dir} was generated with other settings than part 0: {'; '.join(diffs)}")
    data = write_manifest(output_dir, first["stage"], None, counts=_sum_counts([m["counts"] for m in manifests.values()]),
                          complete=True, parts=[found[i, n].name for i in range(n)], logprobs=first["logprobs"],
                          schema=first["schema"], **{GENERATION_INFO_KEY: first[GENERATION_INFO_KEY]})
    data["config"] = {k: v for k, v in first["config"].items() if k != "shard"}
    write_json_atomic(output_dir / MANIFEST, data)
    return data
