"""Reading one table of a site export (CSV or Parquet) into typed numpy columns.

Errors name the file, the data row (1-based, header excluded, the same for CSV and Parquet) and
the column, never a patient identifier.
"""

from __future__ import annotations

import csv
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
    dupes = sorted({c for c in header if header.count(c) > 1})
    if dupes:
        raise DataError(f"{name}: column {dupes[0]} appears more than once in the header; keep one")
    expected = [id_column, *value_columns]
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
        bad = np.flatnonzero(np.isnan(arr))
        if bad.size:
            raise DataError(f"{name} row {bad[0] + 1}, column {col}: value is missing or NaN; "
                            "fill or drop the row in the export")
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


def _diagnose_csv(path: Path, id_column: str, value_columns: list[str]) -> DataError:
    """Find the first malformed row of a CSV that Arrow refused, with the stdlib's reader."""
    name = path.name
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if not header:
                return DataError(f"{name}: the file is empty; export a header row and data")
            numeric = {i for i, c in enumerate(header) if c in value_columns}
            for row_no, row in enumerate(reader, start=1):
                if len(row) != len(header):
                    return DataError(f"{name} row {row_no}: {len(row)} fields where the header has "
                                     f"{len(header)}; fix the quoting or delimiters of that row")
                for i in numeric:
                    cell = row[i].strip()
                    if cell == "":
                        continue  # reported as missing once the file parses
                    try:
                        float(cell)
                    except ValueError:
                        return DataError(f"{name} row {row_no}, column {header[i]}: "
                                         "not a number; export numbers with a '.' decimal point")
    except UnicodeDecodeError:
        return DataError(f"{name}: not UTF-8 text; export the file as UTF-8 CSV")
    except csv.Error as exc:
        return DataError(f"{name}: malformed CSV ({exc}); re-export it")
    return DataError(f"{name}: malformed CSV; re-export it with one header row and "
                     "comma-separated fields")


def _ids(column: pa.ChunkedArray, name: str, col: str) -> tuple[np.ndarray, list[str]]:
    text = column.cast(pa.string())
    blank = pc.or_kleene(pc.is_null(text), pc.equal(pc.utf8_trim_whitespace(text), ""))
    missing = np.flatnonzero(blank.to_numpy(zero_copy_only=False))
    if missing.size:
        raise DataError(f"{name} row {missing[0] + 1}, column {col}: empty patient id; every row "
                        "needs one")
    encoded = pc.dictionary_encode(text.combine_chunks())
    codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    return codes, encoded.dictionary.to_pylist()


def _floats(column: pa.ChunkedArray, name: str, col: str) -> np.ndarray:
    try:
        arr = column.cast(pa.float64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        as_text = column.cast(pa.string()).to_numpy(zero_copy_only=False)
        for i, v in enumerate(as_text):
            try:
                float(v)
            except (TypeError, ValueError):
                raise DataError(f"{name} row {i + 1}, column {col}: not a number; export numbers "
                                "with a '.' decimal point") from None
        raise DataError(f"{name}, column {col}: values are not numbers; re-export it") from None
    return arr.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
