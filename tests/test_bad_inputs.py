"""Every bad input meets hospital IT as one line at ``twinfed data validate``: exit 1, the file,
row and column where there is one, and never a traceback, a patient id or a cell's value."""

import re
from datetime import datetime

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from builders import edit_csv, write_site
from twinfed.cli.main import main
from twinfed.models.spec import load_spec

GLUCOSE_TOML = load_spec("glucose").to_toml()


def _validate_error(capsys, site, spec="glucose") -> str:
    """The one stderr line of a refused ``data validate``, without its ``twinfed: error:``."""
    assert main(["data", "validate", "--spec", str(spec), "--data", str(site)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("twinfed: error: "), err
    assert not re.search(r"\bp[01]\b", err[0])  # the builder's patient ids never reach it
    return err[0].removeprefix("twinfed: error: ")


# --- the export -------------------------------------------------------------------------------

def _parquet_column(column: str, make):
    """Arrange: timeseries as Parquet with ``column`` replaced by ``make(n_rows)``."""
    def arrange(site):
        table = pacsv.read_csv(site / "timeseries.csv", convert_options=pacsv.ConvertOptions(
            column_types={"patient_id": pa.string()}))
        table = table.set_column(table.column_names.index(column), column, make(table.num_rows))
        pq.write_table(table, site / "timeseries.parquet")
        (site / "timeseries.csv").unlink()
    return arrange


def _cell(row: int, column: str, value: str):
    return lambda site: edit_csv(site / "timeseries.csv", row, column, value)


def _drop_header(site):
    # The first data row becomes the "header": time 0 and two zero doses repeat the name "0".
    edit_csv(site / "timeseries.csv", 1, "insulin_u", "0")
    edit_csv(site / "timeseries.csv", 1, "carbs_g", "0")
    lines = (site / "timeseries.csv").read_text().splitlines()
    (site / "timeseries.csv").write_text("\n".join(lines[1:]) + "\n")


EXPORT_CASES = {
    "a_parquet_list_column_is_named": (
        _parquet_column("carbs_g", lambda n: pa.array([[1.0]] * n)),
        "timeseries.parquet, column carbs_g: holds lists; export numbers"),
    "parquet_patient_ids_in_a_list_column_are_named": (
        _parquet_column("patient_id", lambda n: pa.array([["p0"]] * n)),
        ("timeseries.parquet, column patient_id: holds lists; export patient ids as text or whole "
         "numbers")),
    "parquet_binary_patient_ids_that_are_not_utf8_are_named_by_row": (
        _parquet_column("patient_id", lambda n: pa.array([b"ok"] * 2 + [b"\xff\xfe"] * (n - 2))),
        ("timeseries.parquet row 3, column patient_id: patient id is not UTF-8 text; export ids as "
         "UTF-8 strings")),
    "parquet_patient_ids_with_decimals_are_refused_as_they_lose_digits": (
        _parquet_column("patient_id", lambda n: pa.array([float(i // 40) for i in range(n)])),
        ("timeseries.parquet, column patient_id: holds numbers with decimals; export patient ids as "
         "text or whole numbers")),
    "parquet_booleans_are_not_taken_as_0_and_1": (
        _parquet_column("carbs_g", lambda n: pa.array([False] * n)),
        "timeseries.parquet, column carbs_g: holds booleans; export numbers"),
    "parquet_text_in_a_value_column_is_named": (
        _parquet_column("glucose_mgdl", lambda n: pa.array(["100.0"] * n)),
        "timeseries.parquet, column glucose_mgdl: holds text; export numbers"),
    "parquet_timestamps_for_time_min_are_named": (
        _parquet_column("time_min", lambda n: pa.array([datetime(2026, 1, 1)] * n)),
        "timeseries.parquet, column time_min: holds dates or times; export numbers"),
    "a_csv_without_a_header_row_says_so_without_echoing_the_first_row": (
        _drop_header,
        ("timeseries.csv: the first row is not a header naming the spec's columns (patient_id, "
         "time_min, glucose_mgdl, insulin_u, carbs_g); export a header row first")),
    "a_number_with_an_underscore_is_not_a_number_named_by_row_and_column": (
        _cell(5, "glucose_mgdl", "1_000"),
        ("timeseries.csv row 5, column glucose_mgdl: not a number; export numbers with a '.' "
         "decimal point")),
    "a_number_in_another_script_is_not_a_number": (
        _cell(6, "carbs_g", "\u0661\u0662"),
        ("timeseries.csv row 6, column carbs_g: not a number; export numbers with a '.' decimal "
         "point")),
    "infinity_in_a_value_column_is_named_by_row_and_column": (
        _cell(7, "glucose_mgdl", "inf"),
        "timeseries.csv row 7, column glucose_mgdl: value is infinite; export finite numbers"),
    "minus_infinity_is_named_like_infinity": (
        _cell(8, "insulin_u", "-inf"),
        "timeseries.csv row 8, column insulin_u: value is infinite; export finite numbers"),
    "infinity_in_time_min_is_named": (
        _cell(9, "time_min", "Infinity"),
        "timeseries.csv row 9, column time_min: value is infinite; export finite numbers"),
    "an_absurdly_large_time_is_named_without_overflow": (
        _cell(10, "time_min", "1e300"),
        ("timeseries.csv row 10, column time_min: more than 1,000,000,000 minutes (about 1900 "
         "years); time_min counts minutes since the patient's first row")),
}


@pytest.mark.parametrize("arrange, expected", EXPORT_CASES.values(), ids=EXPORT_CASES.keys())
def test_a_bad_export_is_one_line_naming_file_row_and_column(tmp_path, capsys, arrange, expected):
    site = write_site(tmp_path / "site", n_patients=2, n_steps=40)
    arrange(site)
    assert _validate_error(capsys, site) == expected


# --- the spec ---------------------------------------------------------------------------------

SPEC_CASES = {
    "a_huge_step_is_out_of_range_not_a_duplicate_row": (
        "step_minutes = 5", "step_minutes = 1000000000000", "twin.step_minutes: must be at most 10080"),
    "history_beyond_the_bound_is_refused": (
        "history_steps = 24", "history_steps = 100001", "twin.history_steps: must be at most 100000"),
    "context_beyond_the_bound_is_refused": (
        "context_steps = 288", "context_steps = 100001", "twin.context_steps: must be at most 100000"),
    "a_step_written_as_text_is_refused": (
        "step_minutes = 5", 'step_minutes = "5"',
        'twin.step_minutes: must be a whole number (write 5, not "5" or 5.0)'),
    "a_step_written_as_a_float_is_refused": (
        "step_minutes = 5", "step_minutes = 5.0",
        'twin.step_minutes: must be a whole number (write 5, not "5" or 5.0)'),
    "a_step_written_as_a_boolean_is_refused": (
        "step_minutes = 5", "step_minutes = true",
        'twin.step_minutes: must be a whole number (write 5, not "5" or 5.0)'),
    "a_bound_written_as_text_is_refused": (
        "min = 20.0", 'min = "20"', 'twin.states.0.min: must be a number (write 2.5, not "2.5")'),
    "an_infinite_max_is_refused": (
        "max = 600.0", "max = inf", "twin.states.0.max: must be a finite number (not inf or nan)"),
    "a_nan_max_is_refused": (
        "max = 600.0", "max = nan", "twin.states.0.max: must be a finite number (not inf or nan)"),
    "a_minus_infinite_min_is_refused": (
        "min = 20.0", "min = -inf", "twin.states.0.min: must be a finite number (not inf or nan)"),
}


@pytest.mark.parametrize("old, new, expected", SPEC_CASES.values(), ids=SPEC_CASES.keys())
def test_a_bad_spec_is_one_line_naming_the_key(tmp_path, capsys, old, new, expected):
    site = write_site(tmp_path / "site", n_patients=2, n_steps=40)
    assert GLUCOSE_TOML.count(old) == 1
    spec = tmp_path / "spec.toml"
    spec.write_text(GLUCOSE_TOML.replace(old, new))
    assert _validate_error(capsys, site, spec) == f"{spec}: {expected}"


def test_a_spec_that_is_not_utf8_is_named(tmp_path, capsys):
    site = write_site(tmp_path / "site", n_patients=2, n_steps=40)
    spec = tmp_path / "spec.toml"
    spec.write_bytes(GLUCOSE_TOML.replace('"mg/dL"', '"mg/dL \xb5"').encode("latin-1"))
    assert _validate_error(capsys, site, spec) == f"spec {spec}: not UTF-8 text; save the spec as UTF-8"


def test_a_spec_with_a_byte_order_mark_is_read(tmp_path, capsys):
    site = write_site(tmp_path / "site", n_patients=2, n_steps=40)
    spec = tmp_path / "spec.toml"
    spec.write_bytes(b"\xef\xbb\xbf" + GLUCOSE_TOML.encode())
    assert main(["data", "validate", "--spec", str(spec), "--data", str(site)]) == 0


# --- consent ----------------------------------------------------------------------------------

def test_a_consent_file_with_a_byte_order_mark_counts_its_patients(tmp_path, capsys):
    site = write_site(tmp_path / "site", n_patients=2, n_steps=40)
    (site / "consent.csv").write_bytes(b"\xef\xbb\xbf" + (site / "consent.csv").read_bytes())
    assert main(["data", "validate", "--spec", "glucose", "--data", str(site)]) == 0
    assert "2 consented for 'twin-training'" in capsys.readouterr().out
