"""Prompt records from files: JSONL, JSON, Parquet, Arrow, folders of shards, ``save_to_disk``
datasets and ``hf:`` names, turned into Examples with dotted keys and answer extraction."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from lightning_entropy.prompts import DataError, messages_of, plain_text
from lightning_entropy.tasks import TASKS, Example, _split_name, make_task

# ---- prompt files ------------------------------------------------------------------------------

FILE_TYPES = (".jsonl", ".json", ".parquet", ".pq", ".arrow")
Record = tuple[str, dict[str, Any]]  # (where: "file:line" or "file row i", the record)


def _json_records(path: Path) -> list[Record]:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from err
        return [(f"{path} item {i}", r) for i, r in enumerate(rows)]
    records = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append((f"{path}:{line_no}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{line_no}: invalid JSON line: {err}") from err
    return records


def _arrow_rows(path: Path, table: Any) -> list[Record]:
    return [(f"{path} row {i}", r) for i, r in enumerate(table.to_pylist())]


def _read_arrow_stream(path: Path) -> Any:
    import pyarrow as pa

    # datasets' save_to_disk writes Arrow IPC streams; older versions wrote files
    try:
        with pa.memory_map(str(path)) as src:
            return pa.ipc.open_stream(src).read_all()
    except pa.ArrowInvalid:
        with pa.memory_map(str(path)) as src:
            return pa.ipc.open_file(src).read_all()


def _read_file(path: Path) -> list[Record]:
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            return _arrow_rows(path, pq.read_table(path))
        if suffix == ".arrow":
            return _arrow_rows(path, _read_arrow_stream(path))
    except DataError:
        raise
    except Exception as err:  # pyarrow's errors are long; the first line says what is wrong
        raise DataError(
            f"{path}: cannot read: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        ) from err
    if suffix not in (".jsonl", ".json"):
        raise DataError(
            f"{path}: unsupported prompt file type {suffix!r}; use .jsonl, .json, .parquet, a folder of "
            "them, or a datasets save_to_disk folder"
        )
    return _json_records(path)


def _read_saved_dataset(path: Path, split: str) -> list[Record]:
    """A ``datasets`` ``save_to_disk`` folder (a Dataset, or a DatasetDict of splits), read with pyarrow
    alone so that the optional ``datasets`` package is not needed."""
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        if split not in splits:
            raise DataError(f"{path}: a DatasetDict without split {split!r}; its splits: {', '.join(splits)}")
        path = path / split
    state = json.loads((path / "state.json").read_text())
    records: list[Record] = []
    for f in state["_data_files"]:
        records += _read_file(path / f["filename"])
    return records


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def _read_records(path: Path, split: str = "train") -> list[Record]:
    """Records of a file, a ``save_to_disk`` folder, or a folder of shards (read in name order)."""
    if is_saved_dataset(path):
        return _read_saved_dataset(path, split)
    if path.is_dir():
        shards = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in FILE_TYPES)
        if not shards:
            raise DataError(
                f"{path}: a folder with no {'/'.join(FILE_TYPES)} files and no save_to_disk dataset"
            )
        kinds = {".pq" if p.suffix.lower() == ".parquet" else p.suffix.lower() for p in shards}
        if len(kinds) > 1:
            raise DataError(f"{path}: mixes shard types {sorted(kinds)}; keep one type per folder")
        return [rec for p in shards for rec in _read_file(p)]
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    return _read_file(path)


def _read_hf(spec: str, split: str) -> tuple[list[Record], str]:
    """``hf:<name>[@<config>][:<split>]`` through the optional ``datasets`` package. Only the first
    colon ends the name, so a split may carry a slice (``train[:100]``)."""
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            f"{spec} needs the optional 'datasets' package: pip install 'lightning_entropy[datasets]'"
        ) from err
    name, _, hf_split = spec[3:].partition(":")
    name, _, config = name.partition("@")
    label = f"{spec} (split {hf_split or split})"
    ds = datasets.load_dataset(name, config or None, split=hf_split or split)
    return [(f"{label} row {i}", r) for i, r in enumerate(ds.to_list())], label


_MISSING = object()


def get_path(record: dict[str, Any], key: str) -> Any:
    """``record[key]``, where a dotted key walks nested records (``reward_model.ground_truth``); an
    exact key that contains dots wins."""
    if key in record:
        return record[key]
    value: Any = record
    for part in key.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return _MISSING
    return value


def _keys_hint(record: dict[str, Any]) -> str:
    """The record's keys, nested ones dotted, for an error message."""
    out = []
    for k, v in record.items():
        out += [f"{k}.{kk}" for kk in v] if isinstance(v, dict) and v else [k]
    return str(sorted(out))


def _answer_text(value: Any, where: str, key: str, pattern: re.Pattern[str] | None) -> str | None:
    if value is None:
        return None
    if isinstance(value, (dict, list)):
        inner = f" with keys {sorted(value)}" if isinstance(value, dict) else ""
        raise DataError(
            f"{where}: answer_key '{key}' is a {type(value).__name__}{inner}, not an answer; point "
            f"data.answer_key at a field inside it (e.g. {key}.{next(iter(value), 'field')})"
        )
    text = str(value)
    if pattern is not None:
        found = pattern.search(text)
        if found is None:
            raise DataError(
                f"{where}: data.answer_regex {pattern.pattern!r} does not match answer_key '{key}' "
                f"value {text[:80]!r}"
            )
        text = (found.group(1) if pattern.groups else found.group(0)).strip()
    return text


def records_to_examples(
    records: list[Record],
    source: str,
    prompt_key: str,
    answer_key: str | None,
    answer_regex: str | None = None,
) -> list[Example]:
    """Records -> Examples. A prompt is a string or a list of ``{role, content}`` chat messages (kept in
    ``meta["messages"]``; ``prompt`` is their plain text until formatting). Every error names the
    file and line (or row), the key and what the record has."""
    if not records:
        raise DataError(f"{source}: no records")
    try:
        pattern = re.compile(answer_regex) if answer_regex is not None else None
    except re.error as err:
        raise DataError(f"data.answer_regex={answer_regex!r}: not a regular expression: {err}") from err
    out = []
    for row, (where, rec) in enumerate(records):
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected a record (a JSON object), got {type(rec).__name__}")
        for key, what in ((prompt_key, "prompt_key"), (answer_key, "answer_key")):
            if key is not None and get_path(rec, key) is _MISSING:
                raise DataError(f"{where}: no field '{key}' (data.{what}); the record has {_keys_hint(rec)}")
        value = get_path(rec, prompt_key)
        messages = messages_of(value)
        if messages is None and not isinstance(value, str):
            raise DataError(
                f"{where}: prompt_key '{prompt_key}' is a {type(value).__name__}; expected a string or a "
                "list of {role, content} chat messages"
            )
        answer = (
            None
            if answer_key is None
            else _answer_text(get_path(rec, answer_key), where, answer_key, pattern)
        )
        top = {prompt_key.split(".")[0], (answer_key or "").split(".")[0]}
        meta = {k: v for k, v in rec.items() if k not in top}
        meta["row"], meta["where"] = row, where
        if messages is not None:
            meta["messages"] = messages
        out.append(Example(plain_text(messages) if messages else value, answer, meta))
    return out


def load_examples(
    source: str,
    split: str = "train",
    *,
    n: int | None = None,
    seed: int = 0,
    difficulty: int = 1,
    prompt_key: str = "prompt",
    answer_key: str | None = "answer",
    answer_regex: str | None = None,
    file_split: str | None = None,
    **task_options: Any,
) -> list[Example]:
    """Examples from a built-in task name (needs ``n``), a ``.jsonl``/``.json``/``.parquet`` file, a
    folder of such shards, a ``datasets`` ``save_to_disk`` folder (``file_split`` picks the split of a
    DatasetDict, default ``split``), or ``hf:<name>[@<config>][:<split>]``. Files keep their order
    and are cut to the first ``n``."""
    if source in TASKS:
        if n is None:
            raise ValueError(f"task {source!r} is generated: pass n, the number of examples")
        return make_task(source, difficulty, **task_options).generate(split, n, seed)
    if task_options:
        raise ValueError(f"task options {sorted(task_options)} only apply to built-in tasks, not {source}")
    wanted = file_split or (_split_name(split) if split != "warmstart" else "train")
    if source.startswith("hf:"):
        records, label = _read_hf(source, wanted)
    else:
        records, label = _read_records(Path(source), wanted), source
    examples = records_to_examples(records, label, prompt_key, answer_key, answer_regex)
    return examples if n is None else examples[:n]
