"""Reading one table of a site export (CSV or Parquet) in batches of rows, checking every value.

Errors name the file, the data row (1-based, header excluded, the same for CSV and Parquet) and
the column, never a patient identifier, and do not depend on how the file is cut into batches.
Value columns must hold finite numbers: a Parquet column of booleans, text, times or lists is an
error, never silently converted; patient ids are text (UTF-8) or whole numbers.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from twinfed.errors import DataError
from twinfed.models.problems import FirstProblems


@dataclass
class RowBatch:
    """Consecutive data rows of a table whose ids and values passed every check."""

    start: int  # 0-based data row of the first row (header excluded)
    ids: pa.Array  # string ids, non-empty UTF-8
    values: dict[str, np.ndarray]  # float64 [rows] per value column, finite, inside any range

    def __len__(self) -> int:
        return len(self.ids)


# Rows per validation batch at most: the Arrow batch and its float64 copies (~100 bytes a row)
# are what a loader holds beyond its own compact arrays.
BATCH_ROWS = 1 << 16
# Arrow's CSV reader reads blocks ahead of the consumer on its I/O threads (measured here: with
# 16 MiB blocks it held up to 630 MiB of a 750 MB file; with 1 MiB blocks 40 MiB, and 2 s
# slower over 20 million rows).
CSV_BLOCK_BYTES = 1 << 20


def find_table(directory: Path, stem: str) -> Path:
    """The ``stem.csv`` or ``stem.parquet`` in ``directory`` (exactly one of them)."""
    found = [directory / f"{stem}{ext}" for ext in (".csv", ".parquet") if (directory / f"{stem}{ext}").is_file()]
    if not found:
        raise DataError(f"{directory}: no {stem}.csv or {stem}.parquet; export it into the site directory")
    if len(found) > 1:
        raise DataError(f"{directory}: both {stem}.csv and {stem}.parquet exist; keep one")
    return found[0]


def max_rows(path: Path) -> int:
    """An upper bound on the data rows of ``path`` (read from a Parquet file's footer; a CSV's
    line breaks, quoted ones included, bound its records), so a loader can size its arrays
    before it reads: memory never touched is never resident."""
    if path.suffix == ".parquet":
        try:
            return pq.ParquetFile(path).metadata.num_rows
        except (pa.ArrowInvalid, OSError):
            return 0  # reading it will say what is wrong
    lines = 1
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 24):
            lines += chunk.count(b"\n")
    return lines


def stream_table(path: Path, id_column: str, value_columns: list[str], *,
                 ranges: dict[str, tuple[float, float, str]], problems: FirstProblems,
                 batch_rows: int = BATCH_ROWS) -> Iterator[RowBatch]:
    """Read ``path`` with exactly ``id_column`` + ``value_columns`` in batches of rows, checking
    every value.

    ``ranges`` maps a column to (min, max, unit); values outside are errors. A problem with the
    file as a whole (unreadable, malformed, its header, a column's type) is raised at once; a
    problem in a row is noted in ``problems`` and the file read on to its end, so that the
    caller raises the error the whole file deserves (``problems.raise_first()``) wherever the
    batches fall. Batches are yielded only while no problem is noted.
    """
    name = path.name
    expected = [id_column, *value_columns]
    parquet = path.suffix == ".parquet"
    try:
        if parquet:
            source = pq.ParquetFile(path)
            schema = source.schema_arrow
            batches = source.iter_batches(batch_size=batch_rows)
        else:
            types = {id_column: pa.string(), **{c: pa.float64() for c in value_columns}}
            source = pacsv.open_csv(
                path,
                read_options=pacsv.ReadOptions(block_size=min(CSV_BLOCK_BYTES, max(1 << 16, batch_rows * 64)),
                                               use_threads=False),
                convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=False))
            schema = source.schema
            batches = source
        header = schema.names
        no_header = None if parquet else _header_problem(name, header, expected)
        if no_header:
            raise no_header
        dupes = sorted({c for c in header if header.count(c) > 1})
        if dupes:
            raise DataError(f"{name}: column {dupes[0]} appears more than once in the header; keep one")
        missing = [c for c in expected if c not in header]
        if missing:
            raise DataError(f"{name}: missing column {missing[0]}; the spec needs "
                            f"{', '.join(expected)}")
        unknown = [c for c in header if c not in expected]
        if unknown:
            raise DataError(f"{name}: unknown column {unknown[0]}; remove it from the export or add it "
                            "to the twin spec")
        _check_id_type(schema.field(id_column).type, name, id_column)
        numeric = []
        for k, col in enumerate(value_columns):
            problem = _value_type_problem(schema.field(col).type, name, col)
            if problem:
                problems.note((1, k), 0, problem)
            else:
                numeric.append((k, col))
        start = 0
        for record in batches:
            for offset in range(0, record.num_rows, batch_rows):
                part = record.slice(offset, batch_rows)
                batch = _check_batch(part, start, name, id_column, numeric, ranges, problems)
                start += part.num_rows
                if batch is not None and not problems:
                    yield batch
            del record
            # Arrow's allocator keeps freed blocks for reuse: hand them back batch by batch, or
            # the node's peak holds batches it no longer uses (10k patients: 30 MiB less with
            # the default mimalloc pool; the jemalloc and system pools were no smaller).
            pa.default_memory_pool().release_unused()
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError, UnicodeDecodeError) as exc:
        if parquet:
            raise DataError(f"{path.name}: not a readable Parquet file ({_first_line(exc)}); "
                            "re-export it") from None
        raise _diagnose_csv(path, id_column, value_columns) from None


def _check_batch(part: pa.RecordBatch, start: int, name: str, id_column: str,
                 numeric: list[tuple[int, str]], ranges: dict[str, tuple[float, float, str]],
                 problems: FirstProblems) -> RowBatch | None:
    """Check one batch's rows; note their problems (kinds in the order the checks outrank each
    other: ids not UTF-8, ids empty, a column's type, then per column missing or infinite values
    and values out of range)."""
    ids = _batch_ids(part.column(id_column), start, name, id_column, problems)
    values = {}
    for k, col in numeric:
        arr = part.column(col).cast(pa.float64()).to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(~np.isfinite(arr))
        if bad.size:
            row = start + int(bad[0]) + 1
            what = ("value is missing or NaN; fill or drop the row in the export" if np.isnan(arr[bad[0]])
                    else "value is infinite; export finite numbers")
            problems.note((2, k, 0), row, f"{name} row {row}, column {col}: {what}")
        if col in ranges:
            lo, hi, unit = ranges[col]
            bad = np.flatnonzero((arr < lo) | (arr > hi))
            if bad.size:
                row = start + int(bad[0]) + 1
                v = float(arr[bad[0]])
                side, limit = ("above", "max") if v > hi else ("below", "min")
                bound = hi if v > hi else lo
                unit_text = f" ({unit})" if unit else ""
                problems.note((2, k, 1), row, f"{name} row {row}, column {col}: value {v:g} is {side} "
                              f"the spec's {limit} {bound:g}{unit_text}; fix the export or widen the spec")
        values[col] = arr
    return None if ids is None else RowBatch(start=start, ids=ids, values=values)


def _header_problem(name: str, header: list[str], expected: list[str]) -> DataError | None:
    """An error if the first row is no header of ``expected`` columns (e.g. it is data).

    The first row's cells are not echoed: without a header they are a patient's data.
    """
    if any(c in expected for c in header):
        return None
    return DataError(f"{name}: the first row is not a header naming the spec's columns "
                     f"({', '.join(expected)}); export a header row first")


# What Arrow's CSV reader takes as a float64: ASCII digits, no '_' (Python's float() takes
# "1_000" and other scripts' digits, Arrow does not), and the null markers it reads as missing.
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?|[+-]?(?:inf|infinity|nan)",
                     re.ASCII | re.IGNORECASE)
_NULLS = frozenset(pacsv.ConvertOptions().null_values)


def _diagnose_csv(path: Path, id_column: str, value_columns: list[str]) -> DataError:
    """Find the first malformed row of a CSV that Arrow refused, with the stdlib's reader."""
    name = path.name
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if not header:
                return DataError(f"{name}: the file is empty; export a header row and data")
            no_header = _header_problem(name, header, [id_column, *value_columns])
            if no_header:
                return no_header
            numeric = {i for i, c in enumerate(header) if c in value_columns}
            for row_no, row in enumerate(reader, start=1):
                if len(row) != len(header):
                    return DataError(f"{name} row {row_no}: {len(row)} fields where the header has "
                                     f"{len(header)}; fix the quoting or delimiters of that row")
                for i in numeric:
                    cell = row[i].strip()
                    if cell in _NULLS:
                        continue  # reported as missing once the file parses
                    if not _NUMBER.fullmatch(cell):
                        return DataError(f"{name} row {row_no}, column {header[i]}: "
                                         "not a number; export numbers with a '.' decimal point")
    except UnicodeDecodeError:
        return DataError(f"{name}: not UTF-8 text; export the file as UTF-8 CSV")
    except csv.Error as exc:
        return DataError(f"{name}: malformed CSV ({exc}); re-export it")
    return DataError(f"{name}: malformed CSV; re-export it with one header row and "
                     "comma-separated fields")


def _check_id_type(kind: pa.DataType, name: str, col: str) -> None:
    kind = _value_type(kind)
    if not (pa.types.is_integer(kind) or _is_text(kind) or _is_binary(kind)):
        # A float id loses digits of a long record number, so two patients could merge.
        raise DataError(f"{name}, column {col}: holds {_holds(kind)}; export patient ids as text "
                        "or whole numbers")


def _batch_ids(column: pa.Array, start: int, name: str, col: str,
               problems: FirstProblems) -> pa.Array | None:
    """The batch's ids as text, or None (and a noted problem) if one is not UTF-8 text."""
    try:
        text = column.cast(pa.string())
    except pa.ArrowInvalid:
        row = next((i for i, v in enumerate(column.to_pylist()) if not _is_utf8(v)), None)
        where = f"{name}, column {col}" if row is None else f"{name} row {start + row + 1}, column {col}"
        problems.note((0, 0), start if row is None else start + row,
                      f"{where}: patient id is not UTF-8 text; export ids as UTF-8 strings")
        return None
    blank = pc.or_kleene(pc.is_null(text), pc.equal(pc.utf8_trim_whitespace(text), ""))
    missing = np.flatnonzero(blank.to_numpy(zero_copy_only=False))
    if missing.size:
        row = start + int(missing[0]) + 1
        problems.note((0, 1), row, f"{name} row {row}, column {col}: empty patient id; every row "
                      "needs one")
    return text


def _value_type_problem(kind: pa.DataType, name: str, col: str) -> str | None:
    kind = _value_type(kind)
    # Only numbers: Arrow would cast booleans to 0/1 and text to numbers without a word.
    if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind)
            or pa.types.is_null(kind)):
        return f"{name}, column {col}: holds {_holds(kind)}; export numbers"
    return None


def _value_type(kind: pa.DataType) -> pa.DataType:
    """The type of a column's values (a dictionary-encoded column's, not its codes')."""
    return kind.value_type if pa.types.is_dictionary(kind) else kind


def _is_text(kind: pa.DataType) -> bool:
    return (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or pa.types.is_string_view(kind))


def _is_binary(kind: pa.DataType) -> bool:
    return (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
            or pa.types.is_fixed_size_binary(kind) or pa.types.is_binary_view(kind))


def _is_utf8(value: bytes | None) -> bool:
    try:
        (value or b"").decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _holds(kind: pa.DataType) -> str:
    """What a column of ``kind`` holds, for a message."""
    checks = [(pa.types.is_boolean, "booleans"), (pa.types.is_floating, "numbers with decimals"),
              (_is_text, "text"), (_is_binary, "binary data"),
              (pa.types.is_temporal, "dates or times"), (pa.types.is_struct, "structs"),
              (pa.types.is_map, "maps"), (pa.types.is_union, "unions"),
              (pa.types.is_nested, "lists")]
    return next((what for test, what in checks if test(kind)), f"values of type {kind}")


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
