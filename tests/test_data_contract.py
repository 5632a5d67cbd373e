"""The twin spec and the site-data contract: every bad input is one actionable error."""

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from builders import edit_csv, write_site
from twinfed.errors import DataError, SpecError
from twinfed.models.site_data import load_site
from twinfed.models.spec import load_spec, parse_spec
from twinfed.models.windows import WindowIndex

GLUCOSE = load_spec("glucose")


# --- spec -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["glucose", "cardio"])
def test_builtin_specs_round_trip_through_toml(name):
    spec = load_spec(name)
    assert parse_spec(spec.to_toml()) == spec


def test_unknown_key_in_the_twin_table_is_an_error_naming_it():
    text = GLUCOSE.to_toml().replace("step_minutes = 5", "step_minutes = 5\nhorizon_step = 3")
    with pytest.raises(SpecError, match=r"twin\.horizon_step: unknown key"):
        parse_spec(text)


def test_unknown_key_in_a_column_table_is_an_error_naming_its_path():
    text = GLUCOSE.to_toml().replace('unit = "mg/dL"', 'unit = "mg/dL"\nmaxx = 3')
    with pytest.raises(SpecError, match=r"twin\.states\.0\.maxx: unknown key"):
        parse_spec(text)


def test_unknown_top_level_table_is_an_error():
    with pytest.raises(SpecError, match="unknown top-level table"):
        parse_spec(GLUCOSE.to_toml() + "\n[extra]\na = 1\n")


def test_missing_required_key_is_named():
    text = GLUCOSE.to_toml().replace('purpose = "twin-training"\n', "")
    with pytest.raises(SpecError, match=r"twin\.purpose: required key is missing"):
        parse_spec(text)


def test_a_range_whose_max_is_not_above_min_is_refused():
    text = GLUCOSE.to_toml().replace("max = 600.0", "max = 10.0")
    with pytest.raises(SpecError, match="max .* must be above min"):
        parse_spec(text)


def test_reserved_and_duplicate_column_names_are_refused():
    with pytest.raises(SpecError, match="reserved"):
        parse_spec(GLUCOSE.to_toml().replace('column = "carbs_g"', 'column = "time_min"'))
    with pytest.raises(SpecError, match="unique"):
        parse_spec(GLUCOSE.to_toml().replace('column = "carbs_g"', 'column = "insulin_u"'))


def test_invalid_toml_and_missing_file_are_clear(tmp_path):
    with pytest.raises(SpecError, match="not valid TOML"):
        parse_spec("[twin\nname=")
    with pytest.raises(SpecError, match="no such file"):
        load_spec(tmp_path / "nope.toml")


# --- site data --------------------------------------------------------------------------------

@pytest.fixture
def site(tmp_path):
    return write_site(tmp_path / "site", n_patients=3, n_steps=40)


def _error(site_dir) -> str:
    with pytest.raises(DataError) as exc:
        load_site(site_dir, GLUCOSE)
    msg = str(exc.value)
    assert "\n" not in msg
    for pid in ("p0", "p1", "p2"):  # patient identifiers never reach an error message
        assert f"{pid}," not in msg and f"{pid} " not in msg and not msg.endswith(pid)
    return msg


def test_a_clean_site_loads_every_patient_and_row(site):
    data = load_site(site, GLUCOSE)
    assert data.n_patients == 3 and data.n_rows == 120
    assert data.series.shape == (120, 3) and data.covariates.shape == (3, 2)


def test_value_above_max_names_file_row_column_value_and_bound(site):
    edit_csv(site / "timeseries.csv", 17, "glucose_mgdl", "812.0")
    assert _error(site) == ("timeseries.csv row 17, column glucose_mgdl: value 812 is above the spec's "
                            "max 600 (mg/dL); fix the export or widen the spec")


def test_value_below_min_is_named(site):
    edit_csv(site / "timeseries.csv", 5, "insulin_u", "-1")
    assert "row 5, column insulin_u: value -1 is below the spec's min 0 (U)" in _error(site)


@pytest.mark.parametrize("cell", ["", "NaN", "nan"])
def test_missing_or_nan_values_are_named(site, cell):
    edit_csv(site / "timeseries.csv", 9, "carbs_g", cell)
    assert "timeseries.csv row 9, column carbs_g: value is missing or NaN" in _error(site)


def test_non_numeric_value_is_named(site):
    edit_csv(site / "timeseries.csv", 12, "glucose_mgdl", "12,5".replace(",", ";"))
    assert "timeseries.csv row 12, column glucose_mgdl: not a number" in _error(site)


def test_ragged_row_is_named(site):
    lines = (site / "timeseries.csv").read_text().splitlines()
    lines[4] += ",7"
    (site / "timeseries.csv").write_text("\n".join(lines) + "\n")
    assert "timeseries.csv row 4: 6 fields where the header has 5" in _error(site)


def test_unknown_and_missing_columns_are_named(site, tmp_path):
    text = (site / "timeseries.csv").read_text().replace("carbs_g", "carb_g", 1)
    (site / "timeseries.csv").write_text(text)
    assert "timeseries.csv: missing column carbs_g" in _error(site)
    other = write_site(tmp_path / "other", n_patients=2, n_steps=30)
    text = (other / "patients.csv").read_text().splitlines()
    text = [text[0] + ",height_cm"] + [t + ",170" for t in text[1:]]
    (other / "patients.csv").write_text("\n".join(text) + "\n")
    assert "patients.csv: unknown column height_cm" in _error(other)


def test_duplicate_patient_time_row_is_named(site):
    lines = (site / "timeseries.csv").read_text().splitlines()
    lines.insert(6, lines[5])
    (site / "timeseries.csv").write_text("\n".join(lines) + "\n")
    assert "timeseries.csv row 6, column time_min: duplicate (patient, time) row" in _error(site)


def test_time_going_backwards_is_named(site):
    edit_csv(site / "timeseries.csv", 10, "time_min", "5")
    assert "row 10, column time_min: time goes backwards" in _error(site)


def test_time_off_the_step_grid_and_negative_time_are_named(site, tmp_path):
    edit_csv(site / "timeseries.csv", 3, "time_min", "12")
    assert "row 3, column time_min: 12 is not a multiple of the spec's step_minutes 5" in _error(site)
    other = write_site(tmp_path / "o", n_patients=1, n_steps=10)
    edit_csv(other / "timeseries.csv", 1, "time_min", "-5")
    assert "row 1, column time_min: negative time" in _error(other)


def test_patient_without_covariates_and_duplicate_patient_rows_are_named(site):
    lines = (site / "patients.csv").read_text().splitlines()
    (site / "patients.csv").write_text("\n".join(lines[:-1]) + "\n")
    assert "has no row in patients.csv" in _error(site)
    (site / "patients.csv").write_text("\n".join(lines + [lines[1]]) + "\n")
    assert "patients.csv row 4, column patient_id: patient listed twice" in _error(site)


def test_empty_patient_id_is_named(site):
    edit_csv(site / "timeseries.csv", 7, "patient_id", "")
    assert "timeseries.csv row 7, column patient_id: empty patient id" in _error(site)


def test_missing_file_and_two_formats_are_named(site):
    pq.write_table(pacsv.read_csv(site / "timeseries.csv"), site / "timeseries.parquet")
    assert "both timeseries.csv and timeseries.parquet exist" in _error(site)
    (site / "timeseries.csv").unlink()
    (site / "timeseries.parquet").unlink()
    assert "no timeseries.csv or timeseries.parquet" in _error(site)


def test_parquet_export_reads_the_same_as_csv(site):
    from_csv = load_site(site, GLUCOSE)
    table = pacsv.read_csv(site / "timeseries.csv",
                           convert_options=pacsv.ConvertOptions(column_types={"patient_id": pa.string()}))
    pq.write_table(table, site / "timeseries.parquet")
    (site / "timeseries.csv").unlink()
    from_parquet = load_site(site, GLUCOSE)
    assert from_parquet.patient_ids == from_csv.patient_ids
    assert (from_parquet.series == from_csv.series).all()


def test_rows_may_come_in_any_patient_order_and_a_gap_splits_windows(site):
    lines = (site / "timeseries.csv").read_text().splitlines()
    header, body = lines[0], lines[1:]
    p0 = [r for r in body if r.startswith("p0,")]
    rest = [r for r in body if not r.startswith("p0,")]
    # Interleave patients and cut a 10-minute gap into p0 after its 20th row.
    cut = [r.split(",") for r in p0]
    for r in cut[20:]:
        r[1] = str(int(r[1]) + 10)
    (site / "timeseries.csv").write_text("\n".join([header, *rest[:10], *[",".join(r) for r in cut],
                                                    *rest[10:]]) + "\n")
    data = load_site(site, GLUCOSE)
    counts = dict(zip(data.patient_ids, WindowIndex.build(data).counts()))
    w = GLUCOSE.window_steps  # 36: each 20-step piece of p0 is too short, the whole 40 was not
    assert counts == {"p0": 0, "p1": 40 - w + 1, "p2": 40 - w + 1}
