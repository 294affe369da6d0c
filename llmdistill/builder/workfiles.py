"""The build's work files: Arrow IPC files that one phase writes and a later one (or a resumed run) reads.

A work file is written under a temporary name and renamed, so its presence means it is complete, and
read memory-mapped, so a reader pays for the pages it touches rather than for the whole file."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa


@contextmanager
def arrow_writer(path: str | Path, schema: pa.Schema) -> Iterator[pa.ipc.RecordBatchFileWriter]:
    """A writer of an Arrow IPC file that appears at ``path`` only when the block ends without an
    error (written under a temporary name, then renamed); on an error nothing is left behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            yield writer
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_arrow_atomic(table: pa.Table, path: str | Path) -> None:
    """One table as an Arrow IPC file: present means complete."""
    with arrow_writer(path, table.schema) as writer:
        writer.write_table(table)


def read_arrow(path: str | Path) -> pa.Table:
    """A work file as a table whose buffers map the file: nothing is copied, and its pages are read
    from disk only as they are used."""
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_file(source).read_all()


def arrow_metadata(path: str | Path) -> dict[bytes, bytes]:
    """A work file's schema metadata, read from its footer alone."""
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_file(source).schema.metadata or {}
