"""The streaming site loader: whatever the batch size, the same arrays, windows and one-line
errors as reading the whole export at once.

The reference here is computed independently of the loader: the whole CSV read in one go with
Arrow, rows grouped by patient in plain Python.
"""

import csv

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from builders import edit_csv, write_site
from twinfed.errors import DataError
from twinfed.models import site_data
from twinfed.models.cohort import generate_cohort
from twinfed.models.site_data import load_site
from twinfed.models.spec import load_spec
from twinfed.models.windows import WindowIndex

GLUCOSE = load_spec("glucose")
BATCHES = [1, 7, 100, None]  # rows per batch (None: the loader's default)


def _load(site, batch_rows, spec=GLUCOSE):
    return load_site(site, spec) if batch_rows is None else load_site(site, spec, batch_rows=batch_rows)


def _reference(site_dir, spec):
    """Patient ids, series, steps, offsets and covariates, computed without the loader."""
    ts = pacsv.read_csv(site_dir / "timeseries.csv", convert_options=pacsv.ConvertOptions(
        column_types={"patient_id": pa.string()})).to_pydict()
    rows_of: dict[str, list[int]] = {}
    for i, pid in enumerate(ts["patient_id"]):
        rows_of.setdefault(pid, []).append(i)
    ids = list(rows_of)
    order = [i for pid in ids for i in rows_of[pid]]
    series = np.array([[ts[c][i] for c in spec.timeseries_columns] for i in order], dtype=np.float32)
    steps = np.array([round(ts["time_min"][i] / spec.step_minutes) for i in order])
    offsets = np.cumsum([0] + [len(rows_of[pid]) for pid in ids])
    with (site_dir / "patients.csv").open() as fh:
        covs = {r["patient_id"]: [float(r[c]) for c in spec.covariate_columns] for r in csv.DictReader(fh)}
    return ids, series, steps, offsets, np.array([covs[pid] for pid in ids], dtype=np.float32)


def _windows(steps, offsets, w):
    """Every window start, patient by patient, by brute force."""
    return [s for a, b in zip(offsets[:-1], offsets[1:]) for s in range(a, b - w + 1)
            if steps[s + w - 1] - steps[s] == w - 1]


@pytest.fixture(scope="module")
def cohort_site(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort") / "c"
    generate_cohort("glucose", sites=1, patients=12, days=1, seed=3, out=out)
    return out / "site-a"


def _interleave(site_dir):
    """Rewrite the export with patients' rows interleaved (each patient's own order kept) and a
    gap cut into one patient, as some hospital exports come sorted by time, not patient."""
    lines = (site_dir / "timeseries.csv").read_text().splitlines()
    header, body = lines[0], lines[1:]
    by_patient: dict[str, list[str]] = {}
    for line in body:
        by_patient.setdefault(line.split(",")[0], []).append(line)
    queues = list(by_patient.values())
    del queues[1][50:60]  # a 50-minute gap in the second patient
    rng = np.random.default_rng(0)
    mixed = []
    while any(queues):
        q = queues[rng.choice([i for i, q in enumerate(queues) if q])]
        mixed.append(q.pop(0))
    (site_dir / "timeseries.csv").write_text("\n".join([header, *mixed]) + "\n")


@pytest.mark.parametrize("order", ["as generated", "interleaved"])
@pytest.mark.parametrize("batch_rows", BATCHES)
def test_a_generated_cohort_loads_to_the_same_arrays_and_windows_whatever_the_batches(
        cohort_site, tmp_path, order, batch_rows):
    site = tmp_path / "site"
    site.mkdir()
    for f in ("timeseries.csv", "patients.csv"):
        (site / f).write_bytes((cohort_site / f).read_bytes())
    if order == "interleaved":
        _interleave(site)
    ids, series, steps, offsets, covariates = _reference(site, GLUCOSE)
    data = _load(site, batch_rows)
    assert data.patient_ids == ids
    assert data.series.dtype == np.float32 and data.steps.dtype == np.int32
    assert np.array_equal(data.series, series) and np.array_equal(data.steps, steps)
    assert np.array_equal(data.offsets, offsets) and np.array_equal(data.covariates, covariates)
    index = WindowIndex.build(data)
    assert index.starts.tolist() == _windows(steps, offsets, GLUCOSE.window_steps)
    assert index.counts().tolist() == [len(_windows(steps, offsets[p:p + 2], GLUCOSE.window_steps))
                                       for p in range(len(ids))]


@pytest.mark.parametrize("batch_rows", [5, None])
def test_a_parquet_export_loads_like_its_csv_in_any_batches(cohort_site, tmp_path, batch_rows):
    site = tmp_path / "site"
    site.mkdir()
    (site / "patients.csv").write_bytes((cohort_site / "patients.csv").read_bytes())
    table = pacsv.read_csv(cohort_site / "timeseries.csv", convert_options=pacsv.ConvertOptions(
        column_types={"patient_id": pa.string()}))
    pq.write_table(table, site / "timeseries.parquet", row_group_size=1000)
    from_csv = load_site(cohort_site, GLUCOSE)
    data = _load(site, batch_rows)
    assert data.patient_ids == from_csv.patient_ids and np.array_equal(data.offsets, from_csv.offsets)
    assert np.array_equal(data.series, from_csv.series) and np.array_equal(data.steps, from_csv.steps)


def test_a_site_with_more_rows_than_its_estimate_still_loads_whole(cohort_site, monkeypatch):
    expected = load_site(cohort_site, GLUCOSE)
    monkeypatch.setattr(site_data, "max_rows", lambda path: 3)
    data = load_site(cohort_site, GLUCOSE, batch_rows=100)
    assert np.array_equal(data.series, expected.series) and np.array_equal(data.steps, expected.steps)


# --- errors wherever the batches fall -----------------------------------------------------------

@pytest.fixture
def site(tmp_path):
    return write_site(tmp_path / "site", n_patients=3, n_steps=40)  # p0 rows 1-40, p1 41-80, ...


def _errors(site_dir, spec=GLUCOSE) -> set[str]:
    """The loader's error at every batch size (one message if it does not depend on them)."""
    found = set()
    for batch_rows in BATCHES:
        with pytest.raises(DataError) as exc:
            _load(site_dir, batch_rows, spec)
        found.add(str(exc.value))
    return found


def _rows(site_dir):
    lines = (site_dir / "timeseries.csv").read_text().splitlines()
    return lines[0], lines[1:]


def _write(site_dir, header, body):
    (site_dir / "timeseries.csv").write_text("\n".join([header, *body]) + "\n")


def test_a_value_in_a_later_batch_is_named_by_its_row_in_the_file(site):
    edit_csv(site / "timeseries.csv", 117, "carbs_g", "9999")
    assert _errors(site) == {"timeseries.csv row 117, column carbs_g: value 9999 is above the spec's "
                             "max 300 (g); fix the export or widen the spec"}


def test_a_duplicate_row_across_a_batch_boundary_is_named(site):
    header, body = _rows(site)
    body.insert(7, body[6])  # rows 7 and 8 are the same (patient, time): a boundary at 7 rows
    _write(site, header, body)
    assert _errors(site) == {"timeseries.csv row 8, column time_min: duplicate (patient, time) row; "
                             "keep one row per patient per step"}


def test_time_going_backwards_across_a_batch_boundary_is_named(site):
    edit_csv(site / "timeseries.csv", 15, "time_min", "60")  # row 14 is at 65 minutes
    assert _errors(site) == {"timeseries.csv row 15, column time_min: time goes backwards for this "
                             "patient; sort each patient's rows by time_min"}


def test_a_patient_back_after_other_patients_is_checked_against_their_own_last_row(site):
    header, body = _rows(site)
    # p0's last ten rows come after p1 and p2, the first of them a duplicate of p0's row 30
    tail = body[30:40]
    tail[0] = body[29]
    _write(site, header, body[:30] + body[40:] + tail)
    assert _errors(site) == {"timeseries.csv row 111, column time_min: duplicate (patient, time) "
                             "row; keep one row per patient per step"}


def test_of_two_duplicates_the_first_patient_s_is_named_even_when_later_in_the_file(site):
    header, body = _rows(site)
    body[55] = body[54]  # p1's duplicate, row 56
    tail = body[30:40]
    tail[5] = tail[4]  # p0's duplicate, moved after p1 and p2: row 116
    _write(site, header, body[:30] + body[40:] + tail)
    assert _errors(site) == {"timeseries.csv row 116, column time_min: duplicate (patient, time) "
                             "row; keep one row per patient per step"}


def test_the_outranking_problem_is_named_whatever_batch_meets_it_first(site):
    # Columns are checked in the spec's order, a column's missing values before its range: the
    # NaN glucose of row 100 outranks the carbs out of range in row 3.
    edit_csv(site / "timeseries.csv", 3, "carbs_g", "-4")
    edit_csv(site / "timeseries.csv", 100, "glucose_mgdl", "")
    assert _errors(site) == {"timeseries.csv row 100, column glucose_mgdl: value is missing or NaN; "
                             "fill or drop the row in the export"}


def test_a_malformed_row_in_a_later_batch_outranks_a_value_problem_in_an_earlier_one(site):
    edit_csv(site / "timeseries.csv", 2, "carbs_g", "-4")
    edit_csv(site / "timeseries.csv", 90, "insulin_u", "abc")
    assert _errors(site) == {"timeseries.csv row 90, column insulin_u: not a number; export "
                             "numbers with a '.' decimal point"}


def test_a_patient_first_seen_in_a_later_batch_without_covariates_is_named_by_its_first_row(site):
    lines = (site / "patients.csv").read_text().splitlines()
    (site / "patients.csv").write_text("\n".join(lines[:-1]) + "\n")  # p2 (rows 81-120) dropped
    assert _errors(site) == {"timeseries.csv row 81, column patient_id: this patient has no row in "
                             "patients.csv; add the patient's covariates"}


def test_an_empty_id_in_a_later_parquet_batch_is_named_by_its_row(site):
    table = pacsv.read_csv(site / "timeseries.csv", convert_options=pacsv.ConvertOptions(
        column_types={"patient_id": pa.string()}))
    ids = table.column("patient_id").to_pylist()
    ids[96] = ""
    table = table.set_column(0, "patient_id", pa.array(ids))
    pq.write_table(table, site / "timeseries.parquet", row_group_size=16)
    (site / "timeseries.csv").unlink()
    assert _errors(site) == {"timeseries.parquet row 97, column patient_id: empty patient id; every "
                             "row needs one"}


def test_keeping_consented_patients_in_the_loaded_arrays_gives_what_a_copy_gives(cohort_site):
    keep = set(load_site(cohort_site, GLUCOSE).patient_ids[i] for i in (0, 2, 3, 7, 11))
    copied = load_site(cohort_site, GLUCOSE).subset(keep)
    reused = load_site(cohort_site, GLUCOSE).subset(keep, reuse=True)
    assert reused.patient_ids == copied.patient_ids and len(copied.patient_ids) == 5
    for field in ("series", "steps", "offsets", "covariates"):
        assert np.array_equal(getattr(reused, field), getattr(copied, field)), field
