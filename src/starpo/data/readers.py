"""Reading a source's raw rows: local ``.jsonl``/``.json``/``.parquet`` files (``.gz``
accepted for the JSON ones) or directories of them, and hub datasets through
``datasets.load_dataset``. Rows are numbered from 0 within their file so that errors can
name them."""

from __future__ import annotations

import gzip
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starpo.errors import DataError

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".jsonl.gz", ".json.gz")


# --------------------------------------------------------------------------- reading

@dataclass
class _Table:
    """Raw rows of a source: (file or hub name, row index, row dict) plus the column set."""

    rows: list[tuple[str, int, Any]]
    columns: set[str]


def is_local_like(path: str) -> bool:
    return (path.startswith(("/", "./", "../", "~")) or path.endswith(LOCAL_SUFFIXES))


def _open_text(p: Path):
    if p.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(p, "rb"), encoding="utf-8")
    return open(p, encoding="utf-8")


def _read_jsonl(p: Path) -> list[Any]:
    out = []
    with _open_text(p) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"line {lineno} is not valid JSON ({err.msg})",
                                source=str(p), row=len(out)) from None
    return out


def _read_json(p: Path, split: str) -> list[Any]:
    with _open_text(p) as fh:
        text = fh.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":      # JSON lines saved as .json (datasets' to_json)
            return _read_jsonl(p)
        raise DataError(f"not valid JSON ({err.msg}, line {err.lineno})",
                        source=str(p)) from None
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        for key in (split, "data", "rows"):
            if isinstance(data.get(key), list):
                return data[key]
        if data and all(isinstance(v, list) for v in data.values()) and \
                len({len(v) for v in data.values()}) == 1:   # columnar {"col": [...]}
            keys = list(data)
            return [dict(zip(keys, vals)) for vals in zip(*(data[k] for k in keys))]
        return [data]
    raise DataError(f"top-level JSON is {type(data).__name__}; expected a list of rows",
                    source=str(p))


def _read_parquet(p: Path) -> list[Any]:
    import pyarrow.parquet as pq
    return pq.read_table(p).to_pylist()


def _read_file(p: Path, split: str) -> list[Any]:
    name = p.name
    if name.endswith((".jsonl", ".jsonl.gz")):
        return _read_jsonl(p)
    if name.endswith((".json", ".json.gz")):
        return _read_json(p, split)
    if name.endswith(".parquet"):
        return _read_parquet(p)
    raise DataError(f"unsupported file type; expected one of {', '.join(LOCAL_SUFFIXES)}",
                    source=str(p))


def _local_files(d: Path, split: str) -> list[Path]:
    files = sorted(p for p in d.rglob("*") if p.is_file() and p.name.endswith(LOCAL_SUFFIXES))
    if not files:
        raise DataError(f"directory holds no {', '.join(LOCAL_SUFFIXES)} file", source=str(d))
    chosen = [p for p in files
              if p.name.startswith(split) or any(part.startswith(split)
                                                 for part in p.relative_to(d).parts[:-1])]
    return chosen or files


def _table_from(rows_by_file: list[tuple[str, list[Any]]]) -> _Table:
    rows, cols = [], set()
    for src, rs in rows_by_file:
        for i, r in enumerate(rs):
            rows.append((src, i, r))
            if isinstance(r, dict):
                cols.update(r)
    return _Table(rows, cols)


def read_local(path: Path, split: str) -> _Table:
    files = _local_files(path, split) if path.is_dir() else [path]
    return _table_from([(str(f), _read_file(f, split)) for f in files])


def hub_source_name(spec) -> str:
    extra = [f"{k}={v}" for k, v in (("name", spec.config_name), ("data_dir", spec.data_dir))
             if v]
    return f"{spec.path} ({', '.join(extra + [f'split={spec.split}'])})"


def read_hub(spec) -> _Table:
    import datasets
    name = hub_source_name(spec)
    try:
        ds = datasets.load_dataset(spec.path, name=spec.config_name, data_dir=spec.data_dir,
                                   split=spec.split)
    except Exception as err:  # any loader failure is the user's source
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"could not load the hub dataset ({type(err).__name__}: {first}); "
                        "check the path, config_name, data_dir and split, or use a local "
                        "file", source=name) from None
    table = _table_from([(name, ds.to_list() if hasattr(ds, "to_list") else list(ds))])
    table.columns |= set(getattr(ds, "column_names", None) or ())
    return table
