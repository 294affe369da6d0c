"""Config loading shared by every stage: YAML file + command-line overrides.

A YAML file under ``configs/`` is nothing but a saved config dataclass. Keys are checked
against the dataclass before anything runs, so a typo fails fast with the closest valid
name. Command-line flags (``--field value``) override the YAML, and ``--help`` prints each
field's ``metadata["help"]`` through :class:`transformers.HfArgumentParser`, as TRL does. On the
command line a true/false field also takes ``--no_field`` (false), and an optional field takes
``none`` or ``null`` (any case) for null.
"""

from __future__ import annotations

import codecs
import dataclasses
import difflib
import enum
import json
import math
import os
import re
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NewType, TypeVar

import yaml

T = TypeVar("T")


class UserError(ValueError):
    """An error the user's data, config or environment caused: the CLI prints its message as one
    line (file, row or key, and the fix) and exits with code 2; ``--debug`` shows the traceback."""


class ConfigError(UserError):
    """A config file or flag that cannot be used, with what to do about it."""


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError):  # an annotation this Python cannot resolve: leave it to the dataclass
        return {}


def _bool_fields(cls: type) -> set[str]:
    """The true/false fields (``bool`` or ``bool | None``): each takes ``--no_<field>`` for false."""
    hints = _hints(cls)
    return {name for name in _field_names(cls) if hints.get(name) in (bool, bool | None)}


def _nullable_fields(cls: type) -> set[str]:
    """The fields typed ``X | None``, whose ``none``/``null`` on the command line means None. A union with
    more members keeps the text (``report_to: None | str | list[str]`` gives ``none`` a meaning of its own)."""
    hints, out = _hints(cls), set()
    for name in _field_names(cls):
        args = typing.get_args(hints.get(name))
        if typing.get_origin(hints.get(name)) in (typing.Union, types.UnionType) and len(args) == 2 \
                and type(None) in args:
            out.add(name)
    return out


_NULL_WORDS = ("none", "null")


def _unknown_key_message(key: str, cls: type, where: str) -> str:
    close = difflib.get_close_matches(key, _field_names(cls), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else f"; run with --help to list the fields of {cls.__name__}"
    return f"unknown key '{key}' in {where}{hint}"


def read_yaml(path: str | Path, cls: type) -> dict[str, Any]:
    """Read a YAML config file and check that every key is a field of ``cls``.

    Args:
        path: the YAML file.
        cls: the config dataclass that will read it.

    Returns:
        The mapping of field name to value, unvalidated beyond the key check.

    Raises:
        ConfigError: the file is missing, is not UTF-8 YAML, is not a mapping, or has a key that is not
            text or not a field.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text (byte {err.start}): save it as UTF-8") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of field: value, got {type(data).__name__}")
    for key in data:
        if not isinstance(key, str):
            read = ("an unquoted yes, no, on, off, true or false as a boolean" if isinstance(key, bool)
                    else "an empty key, null or ~ as null" if key is None else f"this key as {type(key).__name__}")
            raise ConfigError(f"{path}: key {key!r} is not a field name (YAML reads {read}): write a field name "
                              f"of {cls.__name__}; run with --help to list them")
        if key not in _field_names(cls):
            raise ConfigError(_unknown_key_message(key, cls, str(path)))
    return data


def _describe(tp: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "text", type(None): "null"}
    if tp in names:
        return names[tp]
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(_describe(a) for a in typing.get_args(tp)))
    if origin is list:
        return "a list"
    if origin is dict:
        return "a mapping"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(e.value) for e in tp)
    return getattr(tp, "__name__", str(tp))


def _accepts(tp: Any, value: Any) -> bool:
    """Whether a YAML value fits a field's type (types this cannot judge are left to the dataclass)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(a, value) for a in args)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin is list:
        return isinstance(value, list) and (not args or all(_accepts(args[0], v) for v in value))
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if origin is typing.Literal:
        return value in args
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return isinstance(value, tp) or value in {e.value for e in tp}
    return True


def check_types(cls: type, values: dict[str, Any], where: str) -> None:
    """Fail on a value whose type does not fit its field, naming the file and key.

    Raises:
        ConfigError: e.g. ``train.yaml: max_steps: expected an integer, got 40.5``.
    """
    hints = _hints(cls)
    for key, value in values.items():
        tp = hints.get(key)
        if tp is None or _accepts(tp, value):
            continue
        hint = ""
        if isinstance(value, str) and _accepts(tp, 1.0) and not _accepts(tp, "x"):
            hint = " (YAML reads a number like 3e-3 as text: write 0.003 or 3.0e-3)"
        raise ConfigError(f"{where}: {key}: expected {_describe(tp)}, got {value!r}{hint}")


def check_cli_keys(cls: type, args: list[str]) -> None:
    """Fail on an unknown ``--key`` before any value is parsed or range-checked (``--no_<field>`` or
    ``--no-<field>`` is known for a true/false field)."""
    names = set(_field_names(cls)) | {"config", "help"}
    negatable = _bool_fields(cls)
    for arg in args:
        if arg.startswith("--") and len(arg) > 2:
            key = arg[2:].split("=", 1)[0]
            name = key.replace("-", "_")
            if key in names or name in names or (name.startswith("no_") and name[3:] in negatable):
                continue
            if name.startswith("no_") and name[3:] in names:
                raise ConfigError(f"unknown key '{key}' in the command line: {name[3:]} is not a true/false field, "
                                  f"so it has no --no_{name[3:]}; set it with --{name[3:]} VALUE")
            raise ConfigError(_unknown_key_message(key, cls, "the command line"))


def _construct(cls: type[T], values: dict[str, Any], where: str) -> T:
    """``cls(**values)``, with the ValueError or TypeError of a check the dataclass runs (transformers' and
    TRL's ``__post_init__`` raise plain ones, a JSON decoding error among them) as a ConfigError naming the
    config and where its settings came from."""
    try:
        return cls(**values)
    except UserError:
        raise
    except json.JSONDecodeError as err:  # a dict field given as JSON text, decoded by the dataclass
        named = [key for key, value in values.items() if isinstance(value, str) and value == err.doc]
        field = named[0] if named else "a JSON setting"
        raise ConfigError(f"{where}: invalid {cls.__name__} setting: {field} is not valid JSON ({err.msg} at "
                          f"character {err.pos}): write a JSON object, e.g. '{{\"key\": 1}}'") from None
    except (ValueError, TypeError) as err:
        message = " ".join(str(err).split()) or type(err).__name__
        raise ConfigError(f"{where}: invalid {cls.__name__} setting: {message}") from None


def parse_config(cls: type[T], argv: list[str] | None, prog: str | None = None) -> T:
    """Build a config from ``--config FILE`` plus ``--field value`` overrides.

    Args:
        cls: the config dataclass.
        argv: command-line arguments after the subcommand (``None`` reads ``sys.argv``).
        prog: program name shown by ``--help``.

    Returns:
        An instance of ``cls`` (its ``__post_init__`` has range-checked every field).
    """
    import argparse
    import sys

    from transformers import HfArgumentParser

    nullable = _nullable_fields(cls)

    class Parser(HfArgumentParser):
        def error(self, message: str) -> typing.NoReturn:  # one line naming the flag, not the whole usage text
            raise ConfigError(f"the command line: {message}; run with --help to list the fields")

        def _get_values(self, action: argparse.Action, arg_strings: list[str]) -> Any:
            # called for command-line text only (not for a YAML value argparse converts as a default)
            if action.dest in nullable and len(arg_strings) == 1 and arg_strings[0].strip().lower() in _NULL_WORDS:
                return None
            return super()._get_values(action, arg_strings)

    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)

    # Unknown keys first (YAML, then flags), then types, and only then the dataclass's range checks
    values = read_yaml(known.config, cls) if known.config else {}
    check_cli_keys(cls, rest)
    check_types(cls, values, str(known.config))
    parser = Parser(cls, prog=prog, allow_abbrev=False)
    parser.add_argument("--config", default=None, help="YAML file holding a saved config; flags override it.")
    for name in sorted(_bool_fields(cls)):  # HfArgumentParser adds --no_<field> only where the default is true
        options = [f"--no_{name}", f"--no-{name.replace('_', '-')}"]
        if not any(option in parser._option_string_actions for option in options):
            parser.add_argument(*options, action="store_false", dest=name, default=argparse.SUPPRESS,
                                help=argparse.SUPPRESS)
    parser.set_defaults(**values)
    namespace, remaining = parser.parse_known_args(args=rest)
    if remaining:
        raise ConfigError(f"unexpected argument(s) {remaining!r}: every option is --field value")
    fields = set(_field_names(cls))
    where = " and ".join(part for part in (known.config, "the command line" if rest else None) if part)
    return _construct(cls, {k: v for k, v in vars(namespace).items() if k in fields}, where or "the defaults")


def load_config(cls: type[T], path: str | Path | None = None, **overrides: Any) -> T:
    """Library entry point: a config from an optional YAML file and keyword overrides."""
    values: dict[str, Any] = read_yaml(path, cls) if path else {}
    for key in overrides:
        if key not in _field_names(cls):
            raise ConfigError(_unknown_key_message(key, cls, "the keyword overrides"))
    if path:
        check_types(cls, values, str(path))
    values.update(overrides)
    where = " and ".join(part for part in (path and str(path), "the keyword overrides" if overrides else None) if part)
    return _construct(cls, values, where or "the defaults")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-serialisable view of a config dataclass (for manifests and resume checks)."""
    if hasattr(cfg, "to_dict") and callable(cfg.to_dict):
        data = cfg.to_dict()
    else:
        data = dataclasses.asdict(cfg)
    return json.loads(json.dumps(data, default=str))


def save_config(cfg: Any, path: str | Path) -> None:
    """Write a config as YAML that :func:`read_yaml` reads back."""
    names = set(_field_names(type(cfg)))
    # transformers' to_dict() masks every *_token field as "<FIELD_NAME>": such a placeholder is not a value
    data = {k: v for k, v in config_to_dict(cfg).items() if k in names and v != f"<{k.upper()}>"}
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def looks_like_local_path(value: str) -> bool:
    """True when ``value`` cannot be a hub id (``org/name``), so it must exist on disk."""
    return (value.startswith(("/", ".", "~")) or value.endswith((".jsonl", ".json", ".parquet"))
            or not _HUB_ID.fullmatch(value))


#: The type of ``resume_from_checkpoint``: a checkpoint path, or a word of :func:`normalize_resume`.
#: Any YAML value passes the type check (a bool ``true`` included); ``normalize_resume`` judges it.
CheckpointRef = NewType("CheckpointRef", str)
#: ``resume_from_checkpoint`` after :func:`normalize_resume`: the newest complete checkpoint in output_dir.
RESUME_LATEST = "latest"
_RESUME_LATEST_WORDS = ("latest", "true")
_RESUME_OFF_WORDS = ("", "false", "none", "null")


def normalize_resume(value: Any) -> str | None:
    """``resume_from_checkpoint`` as given (YAML bool, command-line text, path) -> a path, ``latest`` or None.

    ``true``/``latest`` (any case, or the bool True) mean the newest complete checkpoint in
    output_dir; ``false``/``none``/``null``/empty (or False/None) mean no resume; anything else is a
    path (write ``./latest`` for a directory really called ``latest``).

    Raises:
        ConfigError: a value that is neither text nor a bool.
    """
    if value is None or value is False:
        return None
    if value is True:
        return RESUME_LATEST
    if not isinstance(value, str):
        raise ConfigError(f"resume_from_checkpoint={value!r}: expected a checkpoint directory, 'latest' (or true) "
                          "for the newest complete checkpoint in output_dir, or false")
    word = value.strip().lower()
    if word in _RESUME_LATEST_WORDS:
        return RESUME_LATEST
    if word in _RESUME_OFF_WORDS:
        return None
    return value


def check_model_path(name: str, value: str) -> None:
    """Fail when ``value`` is meant as a local path (not a plausible hub id) and does not exist."""
    if not os.path.exists(os.path.expanduser(value)) and looks_like_local_path(value):
        raise ConfigError(f"{name} '{value}' does not exist (and is not a hub id like 'org/name'): fix the path")


def check_range(name: str, value: float | int | None, lo: float | None = None, hi: float | None = None) -> None:
    """Raise a ConfigError when ``value`` lies outside ``[lo, hi]``, or is NaN or infinite (every
    comparison with NaN is false, so it would pass any range)."""
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name}={value} is not a finite number: set a number")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
        raise ConfigError(f"{name}={value} is out of range {bounds}")


def check_choice(name: str, value: str, choices: list[str] | tuple[str, ...]) -> None:
    """Raise a ConfigError when ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {list(choices)}")


def parse_json_field(name: str, value: str | dict | None) -> dict:
    """Decode a dict-valued field given as JSON text on the command line."""
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        return value
    try:
        out = json.loads(value)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{name} must be a JSON object, e.g. '{{\"key\": 1}}': {err}") from err
    if not isinstance(out, dict):
        raise ConfigError(f"{name} must be a JSON object, got {type(out).__name__}")
    return out


def first_mixed_value(values: list[Any]) -> int | None:
    """Where a column of JSON values stops being one Arrow column: the index of the first value that
    cannot be stored beside the values before it (a number after text, a list after a number, an
    integer past 64 bits), or None when all of them fit one type. A bisection over prefixes: a
    prefix converts exactly when it ends before that value."""
    import pyarrow as pa

    def converts(prefix: list[Any]) -> bool:
        try:
            pa.array(prefix)
        except (pa.ArrowException, OverflowError):
            return False
        return True

    if converts(values):
        return None
    lo, hi = 1, len(values)  # values[:lo - 1] converts, values[:hi] does not
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if converts(values[:mid]) else (lo, mid)
    return lo - 1


def json_document(path: Path, error: type[UserError] = ConfigError) -> Any:
    """A user's whole-document JSON file (a .json list of rows), parsed; a file that is not UTF-8 or not
    JSON raises ``error`` naming the file and where it breaks."""
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise error(f"{path} is not UTF-8 text (byte {err.start}): save it as UTF-8") from None
    except json.JSONDecodeError as err:
        raise error(f"{path} line {err.lineno} column {err.colno} is not valid JSON ({err.msg}): fix the file") from None


JSON_READ_BYTES = 1 << 20  # bytes read at a time by :func:`json_array_objects`
_JSON_SPACE = " \t\n\r"


def json_array_objects(path: Path, error: type[UserError] = ConfigError,
                       limit: int | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """The objects of a user's .json file holding a list of rows, one at a time with its index: the
    file is read :data:`JSON_READ_BYTES` at a time, so memory holds about one read and one row, not
    the document. With ``limit``, the first ``limit`` objects only.

    Raises:
        error: a file that is not UTF-8, not JSON (naming the line and column), not a list, or a row
            that is not an object (naming the row).
    """
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    state = {"text": "", "line": 1, "column": 0, "read": 0, "eof": False}  # the kept text, where it starts

    with Path(path).open("rb") as fh:

        def refill(keep: int) -> bool:
            """Drop the text before ``keep`` and append the next read; False at the end of the file."""
            if state["eof"]:
                return False
            text, dropped = state["text"], state["text"][:keep]
            newlines = dropped.count("\n")
            state["line"] += newlines
            state["column"] = len(dropped) - dropped.rfind("\n") - 1 if newlines else state["column"] + len(dropped)
            chunk = fh.read(JSON_READ_BYTES)
            try:
                state["text"] = text[keep:] + utf8.decode(chunk, final=not chunk)
            except UnicodeDecodeError as err:
                raise error(f"{path} is not UTF-8 text (byte {state['read'] + err.start}): save it as UTF-8") from None
            state["read"] += len(chunk)
            state["eof"] = not chunk
            return True

        def where(position: int) -> str:
            text = state["text"]
            newline = text.rfind("\n", 0, position)
            column = position - newline - 1 if newline >= 0 else state["column"] + position
            return f"line {state['line'] + text.count(chr(10), 0, position)} column {column + 1}"

        def skip(position: int) -> int:
            """The position of the next character that is not white space (the text's length at the end)."""
            while True:
                text = state["text"]
                while position < len(text) and text[position] in _JSON_SPACE:
                    position += 1
                if position < len(text) or not refill(position):
                    return position
                position = 0

        position = skip(0)
        text = state["text"]
        if position == len(text) or text[position] != "[":
            kind = "empty" if position == len(text) else f"a JSON document starting with {text[position]!r}"
            raise error(f"{path} is {kind}, expected a list of row objects ([{{...}}, {{...}}]): write the rows "
                        "as a JSON list, or one object per line in a .jsonl file")
        def end_of_list(position: int) -> None:  # the list closed at ``position``: nothing may follow
            rest = skip(position + 1)
            if rest < len(state["text"]):
                raise error(f"{path} {where(rest)} is not valid JSON (text after the list of rows): fix the file")

        position = skip(position + 1)
        if state["text"][position:position + 1] == "]":
            return end_of_list(position)
        index = 0
        while limit is None or index < limit:
            while True:  # one row, reading on while it is cut off
                try:
                    record, end = decoder.raw_decode(state["text"], position)
                    if end == len(state["text"]) and not state["eof"] and not isinstance(record, (dict, list, str)):
                        raise json.JSONDecodeError("a number or literal may go on", state["text"], end)
                    break
                except json.JSONDecodeError as err:
                    if not refill(position):
                        raise error(f"{path} {where(err.pos)} is not valid JSON ({err.msg}): fix the file") from None
                    position = 0
            if not isinstance(record, dict):
                raise error(f"{path} row {index} is a JSON {type(record).__name__}, expected an object")
            yield index, record
            index += 1
            position = skip(end)
            after = state["text"][position:position + 1]
            if after == "]":
                return end_of_list(position)
            if after != ",":
                raise error(f"{path} {where(position)} is not valid JSON (expected ',' or ']' after row {index - 1}): "
                            "fix the file")
            position = skip(position + 1)


def jsonl_objects(path: Path, error: type[UserError] = ConfigError,
                  limit: int | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """The JSON objects of a user's JSONL file (prompt rows, seed queries, benchmark problems), one
    line at a time, each with its line number; blank lines are skipped. With ``limit``, the first
    ``limit`` objects only (the lines after them are not read). A ``.gz`` file is read decompressed.

    Raises:
        error: a line that is not JSON, or not a JSON object, naming the file and the line; a ``.gz``
            file that is not gzip, or cut short.
    """
    import gzip

    count = 0
    gzipped = str(path).endswith(".gz")
    with gzip.open(path, "rb") if gzipped else Path(path).open("rb") as fh:
        lines = enumerate(fh, start=1)
        while True:
            try:
                number, raw = next(lines)
            except StopIteration:
                return
            except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
                if not gzipped:
                    raise
                raise error(f"{path} is not a complete gzip file ({err}): compress it again, or give the "
                            "uncompressed .jsonl") from None
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise error(f"{path} line {number} is not UTF-8 text (byte {err.start} of the line): save the file "
                            "as UTF-8") from None
            if not line.strip():
                continue
            if limit is not None and count >= limit:
                return
            count += 1
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise error(f"{path} line {number} is not valid JSON ({err.msg}): fix or remove that line") from None
            if not isinstance(record, dict):
                raise error(f"{path} line {number} is a JSON {type(record).__name__}, expected an object")
            yield number, record
