"""Data files on the local disk as `datasets.Dataset` tables: CSV (and TSV with a header row),
JSON/JSONL and Parquet, read by the `datasets` library under a cache keyed by the file's
content, so a file rewritten with its old modification time (``cp -p``, ``rsync -a``,
``tar x``) is read again rather than served from the stale copy `datasets` keys on path and
time. Before `datasets` sees a text file it is checked here, so that what is wrong is said
with the file's name: empty, not UTF-8 (where and how to convert it), a header naming one
column twice, a folder where a file was expected.

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "latin.csv"
    >>> _ = path.write_bytes("text,label\\ncaf\\xe9,1\\n".encode("latin-1"))
    >>> load_table(path)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: .../latin.csv is not UTF-8 text: line 2 has byte 0xe9; save it as UTF-8 (from Latin-1: iconv -f latin1 -t utf-8 latin.csv > utf8.csv, or pandas' to_csv(..., encoding="utf-8"))
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import os
from pathlib import Path
from typing import Any

FILE_FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
CHUNK = 1 << 20


def load_table(path: str | os.PathLike, sep: str | None = None) -> Any:
    """A CSV, JSON/JSONL or Parquet file as a `datasets.Dataset` (``sep``: a CSV's delimiter).

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "train.csv"
    >>> _ = path.write_text("text,label\\ngood,1\\nbad,0\\n")
    >>> load_table(path).column_names
    ['text', 'label']
    """
    import datasets

    path = Path(path)
    if path.is_dir():
        raise ValueError(
            f"{path} is a folder, not a data file: give a .tsv, .csv, .json, .jsonl or .parquet file (a "
            "folder holding train.tsv and dev.tsv is the training data, given as the task)"
        )
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file or task folder")
    kind = "csv" if sep is not None else FILE_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ValueError(
            f"{path}: unknown data file type {path.suffix!r}; give a .tsv (LABEL<TAB>TEXT), .csv, .json, "
            ".jsonl or .parquet file, or a folder holding train.tsv and dev.tsv"
        )
    digest = content_digest(path, text=kind != "parquet")
    if kind == "csv":
        check_header(path, sep or ",")
    options = {"delimiter": sep} if sep is not None else {}
    cache = Path(datasets.config.HF_DATASETS_CACHE) / "peftplan" / digest  # a changed file is a new cache
    try:
        return datasets.load_dataset(kind, data_files=str(path), split="train", cache_dir=str(cache), **options)
    except Exception as e:  # datasets' parse errors do not name the file
        if "corresponds to no data" in str(e):  # how datasets says a file holds a header alone
            raise ValueError(f"{path} has no examples") from None
        raise ValueError(f"{path}: cannot read it as {kind}: {_cause(e)}") from None


def content_digest(path: Path, *, text: bool) -> str:
    """The SHA-256 of the file's bytes (16 hex digits); a ``text`` file must be non-empty UTF-8."""
    digest, decoder = hashlib.sha256(), codecs.getincrementaldecoder("utf-8")()
    lines = size = 0
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
            if text:
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as e:
                    at = lines + chunk[: e.start].count(b"\n") + 1
                    raise ValueError(not_utf8(path, at, chunk[e.start])) from None
                lines += chunk.count(b"\n")
            size += len(chunk)
    if text and size:
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise ValueError(not_utf8(path, lines + 1, None)) from None
    if not size:
        raise ValueError(
            f"{path} is empty (0 bytes): write the examples into it, with a header row naming the columns for a table"
        )
    return digest.hexdigest()[:16]


def not_utf8(path: Path, line: int, byte: int | None) -> str:
    """What to say of a file that is not UTF-8 text: where, and how to convert it."""
    what = f"byte 0x{byte:02x}" if byte is not None else "a character cut off at the end"
    return (
        f"{path} is not UTF-8 text: line {line} has {what}; save it as UTF-8 (from Latin-1: iconv -f latin1 -t utf-8 {path.name} > "
        f'utf8{path.suffix}, or pandas\' to_csv(..., encoding="utf-8"))'
    )


def check_header(path: Path, sep: str) -> None:
    """A table's header row must name each column once (pandas would rename the second ``text``
    to ``text.1``, and the column would be silently ignored)."""
    with path.open(encoding="utf-8", newline="") as f:
        header = next(csv.reader(f, delimiter=sep), [])
    seen: set[str] = set()
    twice = sorted({name for name in header if name in seen or seen.add(name)})
    if twice:
        raise ValueError(
            f"{path}: the header row names column(s) {twice} more than once ({header}); give each column a "
            "name of its own (pair_column=... reads a sentence pair's second text)"
        )


def _cause(e: BaseException) -> str:
    """The innermost reason of a `datasets` error (its own message is "An error occurred while
    generating the dataset"), on one line."""
    while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
        e = e.__cause__ or e.__context__
    return " ".join(f"{type(e).__name__}: {e}".split())[:500]


def text_cell(v: Any, source: str, column: str) -> str:
    """A table cell that must hold a text, checked: anything else (a number, a missing value)
    is an error naming the file and the column.

    >>> text_cell(3.0, "train.csv", "text")
    Traceback (most recent call last):
    ...
    ValueError: train.csv: column 'text' holds float 3.0 where a text is expected; fill in missing texts or name another column
    """
    if not isinstance(v, str):
        raise ValueError(
            f"{source}: column {column!r} holds {type(v).__name__} {v!r} where a text is expected; "
            "fill in missing texts or name another column"
        )
    return v
