"""Reading one table of a site export (CSV or Parquet) into typed numpy columns.

Errors name the file, the data row (1-based, header excluded, the same for CSV and Parquet) and
the column, never a patient identifier. Value columns must hold finite numbers: a Parquet column
of booleans, text, times or lists is an error, never silently converted; patient ids are text
(UTF-8) or whole numbers.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from twinfed.errors import DataError


@dataclass
class Table:
    """A validated table: string ids and float64 value columns, in file order."""

    path: Path
    id_codes: np.ndarray  # int64 [rows]: index into ``id_values``
    id_values: list[str]  # distinct ids in order of first appearance
    values: dict[str, np.ndarray]

    @property
    def n_rows(self) -> int:
        return len(self.id_codes)


def find_table(directory: Path, stem: str) -> Path:
    """The ``stem.csv`` or ``stem.parquet`` in ``directory`` (exactly one of them)."""
    found = [directory / f"{stem}{ext}" for ext in (".csv", ".parquet") if (directory / f"{stem}{ext}").is_file()]
    if not found:
        raise DataError(f"{directory}: no {stem}.csv or {stem}.parquet; export it into the site directory")
    if len(found) > 1:
        raise DataError(f"{directory}: both {stem}.csv and {stem}.parquet exist; keep one")
    return found[0]


def read_table(path: Path, id_column: str, value_columns: list[str], *,
               ranges: dict[str, tuple[float, float, str]]) -> Table:
    """Read ``path`` with exactly ``id_column`` + ``value_columns`` and check every value.

    ``ranges`` maps a column to (min, max, unit); values outside are errors.
    """
    table = _read_arrow(path, id_column, value_columns)
    name = path.name
    header = table.column_names
    expected = [id_column, *value_columns]
    no_header = _header_problem(name, header, expected) if path.suffix != ".parquet" else None
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
    id_codes, id_values = _ids(table.column(id_column), name, id_column)
    values = {c: _floats(table.column(c), name, c) for c in value_columns}
    del table
    for col, arr in values.items():
        bad = np.flatnonzero(~np.isfinite(arr))
        if bad.size and np.isnan(arr[bad[0]]):
            raise DataError(f"{name} row {bad[0] + 1}, column {col}: value is missing or NaN; "
                            "fill or drop the row in the export")
        if bad.size:
            raise DataError(f"{name} row {bad[0] + 1}, column {col}: value is infinite; export "
                            "finite numbers")
        if col in ranges:
            lo, hi, unit = ranges[col]
            bad = np.flatnonzero((arr < lo) | (arr > hi))
            if bad.size:
                row = int(bad[0])
                v = float(arr[row])
                side, limit = ("above", "max") if v > hi else ("below", "min")
                bound = hi if v > hi else lo
                unit_text = f" ({unit})" if unit else ""
                raise DataError(f"{name} row {row + 1}, column {col}: value {v:g} is {side} the "
                                f"spec's {limit} {bound:g}{unit_text}; fix the export or widen the spec")
    return Table(path=path, id_codes=id_codes, id_values=id_values, values=values)


def _read_arrow(path: Path, id_column: str, value_columns: list[str]) -> pa.Table:
    try:
        if path.suffix == ".parquet":
            return pq.read_table(path)
        types = {id_column: pa.string(), **{c: pa.float64() for c in value_columns}}
        return pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(block_size=1 << 24),
            convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=False),
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError, UnicodeDecodeError) as exc:
        if path.suffix == ".parquet":
            raise DataError(f"{path.name}: not a readable Parquet file ({_first_line(exc)}); "
                            "re-export it") from None
        raise _diagnose_csv(path, id_column, value_columns) from None


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


def _ids(column: pa.ChunkedArray, name: str, col: str) -> tuple[np.ndarray, list[str]]:
    kind = _value_type(column.type)
    if not (pa.types.is_integer(kind) or _is_text(kind) or _is_binary(kind)):
        # A float id loses digits of a long record number, so two patients could merge.
        raise DataError(f"{name}, column {col}: holds {_holds(kind)}; export patient ids as text "
                        "or whole numbers")
    try:
        text = column.cast(pa.string())
    except pa.ArrowInvalid:
        row = next((i for i, v in enumerate(column.to_pylist()) if not _is_utf8(v)), None)
        where = f"{name}, column {col}" if row is None else f"{name} row {row + 1}, column {col}"
        raise DataError(f"{where}: patient id is not UTF-8 text; export ids as UTF-8 "
                        "strings") from None
    blank = pc.or_kleene(pc.is_null(text), pc.equal(pc.utf8_trim_whitespace(text), ""))
    missing = np.flatnonzero(blank.to_numpy(zero_copy_only=False))
    if missing.size:
        raise DataError(f"{name} row {missing[0] + 1}, column {col}: empty patient id; every row "
                        "needs one")
    encoded = pc.dictionary_encode(text.combine_chunks())
    codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    return codes, encoded.dictionary.to_pylist()


def _floats(column: pa.ChunkedArray, name: str, col: str) -> np.ndarray:
    kind = _value_type(column.type)
    # Only numbers: Arrow would cast booleans to 0/1 and text to numbers without a word.
    if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind)
            or pa.types.is_null(kind)):
        raise DataError(f"{name}, column {col}: holds {_holds(kind)}; export numbers")
    arr = column.cast(pa.float64())
    return arr.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)


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
