"""Raw rows of a benchmark: a local file, a file inside an installed package, a Python loader, the hub.

Every reader returns the dataset's own rows (dicts keyed by the dataset's columns); renaming to
our fields and building items is :func:`llmdistill.benchmarks.load_benchmark`'s job.
"""

from __future__ import annotations

import importlib
from importlib import resources
from pathlib import Path
from typing import Any

from llmdistill.benchmarks.definition import BenchmarkError, BenchmarkSpec
from llmdistill.config.base import json_document, jsonl_objects


def file_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a .jsonl, .jsonl.gz, .json (a list, or ``{"data"|"rows": [...]}``), .parquet or .csv file.

    Raises:
        BenchmarkError: a missing file, a line or document that is not JSON, JSON that is not a list
            of objects, or a file without rows, naming the file and the line or row.
    """
    if not path.exists():
        raise BenchmarkError(f"data_path {path} does not exist")
    suffixes = "".join(path.suffixes[-2:])
    if suffixes.endswith((".jsonl", ".jsonl.gz")):
        rows = [row for _, row in jsonl_objects(path, BenchmarkError)]
    elif path.suffix == ".json":
        rows = _json_rows(path)
    elif path.suffix in (".parquet", ".csv"):
        rows = _table_rows(path)
    else:
        raise BenchmarkError(f"data_path {path}: use a .jsonl, .jsonl.gz, .json, .parquet or .csv file")
    if not rows:
        raise BenchmarkError(f"data_path {path} holds no rows: give it one row per problem")
    return rows


def _table_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a .parquet or .csv file, read with Arrow; a CSV's values stay text ("0.50", "007")."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        if path.suffix == ".parquet":
            table = pq.read_table(path)
        else:
            with pacsv.open_csv(path) as reader:
                names = reader.schema.names
            text = pacsv.ConvertOptions(column_types=dict.fromkeys(names, pa.string()))
            table = pacsv.read_csv(path, convert_options=text)
    except (pa.ArrowInvalid, OSError) as err:
        reason = " ".join(str(err).split())[:300]
        raise BenchmarkError(f"data_path {path} cannot be read as {path.suffix[1:]} ({reason}): fix the file, or "
                             "write it as .jsonl, one JSON object per problem") from None
    return table.to_pylist()


def _json_kind(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages."""
    kinds = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def _json_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a .json file: a list of objects, or an object holding one under ``data`` or ``rows``."""
    data, where = json_document(path, BenchmarkError), str(path)
    if isinstance(data, dict):
        key = next((k for k in ("data", "rows") if k in data), None)
        if key is None:
            raise BenchmarkError(f"{path} is a JSON object without a 'data' or 'rows' list (keys: "
                                 f"{sorted(data)[:10]}): write the rows as a list, or under \"data\"")
        data, where = data[key], f"{path} '{key}'"
    if not isinstance(data, list):
        raise BenchmarkError(f"{where} is a JSON {_json_kind(data)}, expected a list of row objects "
                             f"([{{\"problem\": ..., \"answer\": ...}}, ...])")
    for index, row in enumerate(data):
        if not isinstance(row, dict):
            raise BenchmarkError(f"{where}, row {index} is a JSON {_json_kind(row)}, expected an object")
    return data


def package_rows(spec: BenchmarkSpec) -> list[dict[str, Any]]:
    """Rows of a data file shipped inside an installed package (``package:relative/path``)."""
    assert spec.source.package_file
    package, relative = spec.source.package_file.split(":", 1)
    try:
        resource = resources.files(package).joinpath(relative)
    except ModuleNotFoundError as err:
        raise BenchmarkError(f"benchmark '{spec.name}': package '{package}' is not installed "
                             f"({spec.source.package_file}); install it or pass --data_path FILE") from err
    with resources.as_file(resource) as path:
        if not path.is_file():
            raise BenchmarkError(f"benchmark '{spec.name}': {spec.source.package_file} is not in the installed "
                                 f"package; pass --data_path FILE")
        return file_rows(path)


def python_rows(spec: BenchmarkSpec, limit: int | None) -> list[dict[str, Any]]:
    """Rows returned by a ``module:function`` loader, called as ``function(**args, limit=limit)``.

    The loader is imported only now, so registering a generated benchmark costs nothing until it
    is loaded. ``limit`` (``None``: all) lets a generator make only what is needed.
    """
    assert spec.source.python
    module_name, function_name = spec.source.python.split(":")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as err:
        raise BenchmarkError(f"benchmark '{spec.name}': cannot import loader {spec.source.python}: {err}") from err
    return [dict(row) for row in function(**spec.source.args, limit=limit)]


def hub_rows(spec: BenchmarkSpec) -> list[dict[str, Any]]:
    """Rows of the canonical Hugging Face dataset, with a way out when the hub cannot be reached."""
    import datasets

    src = spec.source
    try:
        return datasets.load_dataset(src.hub, src.config, split=src.split).to_list()
    except Exception as err:  # offline, gated, renamed: every failure gets the same way out
        raise BenchmarkError(
            f"could not load benchmark '{spec.name}' from the hub ({src.hub}, split {src.split}): "
            f"{type(err).__name__}: {str(err)[:300]}. Download it where the hub is reachable and pass "
            f"--data_path FILE (.jsonl/.json/.parquet/.csv), with --column_map if its columns are not "
            f"{sorted(set(spec.columns.values()))}"
        ) from err
