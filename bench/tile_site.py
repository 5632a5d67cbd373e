"""A large site for the node-memory curve, tiled from a generated one (benchmark only).

Generating 50,000 patients x 7 days takes minutes and about 10 GiB in the simulator; the node's
memory depends on the rows and the patients, not on the physiology. So copy ``k`` of a site is
the site again with every patient id suffixed ``-t{k}`` (copy 0 keeps the original ids), in all
three files of the data contract, and nothing else changed. Written a batch at a time with
Arrow, into ``out/.partial`` first and renamed into place, like a generated cohort.

``python -m bench.tile_site COHORT_DIR OUT_DIR COPIES`` tiles each site of a cohort.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

FILES = ("timeseries.csv", "patients.csv", "consent.csv")


def tile_cohort(cohort: Path, out: Path, copies: int) -> Path:
    """``out``: ``cohort``'s spec and each of its sites tiled ``copies`` times (no holdout or
    truth: the node-memory probe reads one site)."""
    if copies < 1:
        raise ValueError("copies must be at least 1")
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copy2(cohort / "spec.toml", tmp / "spec.toml")
    for site in sorted(p for p in cohort.iterdir() if p.is_dir() and (p / "timeseries.csv").is_file()
                       and p.name != "holdout"):
        (tmp / site.name).mkdir()
        for name in FILES:
            if (site / name).is_file():
                _tile_file(site / name, tmp / site.name / name, copies)
    tmp.rename(out)
    return out


def _tile_file(src: Path, dst: Path, copies: int) -> None:
    # Every column read as text and written back as read (unquoted: the generated ids hold no
    # comma or quote), so no number is re-formatted.
    header = pacsv.open_csv(src).schema.names
    types = {c: pa.string() for c in header}
    with pacsv.CSVWriter(dst, pa.schema([(c, pa.string()) for c in header]),
                         write_options=pacsv.WriteOptions(quoting_style="none")) as writer:
        for k in range(copies):
            reader = pacsv.open_csv(src, read_options=pacsv.ReadOptions(block_size=1 << 22),
                                    convert_options=pacsv.ConvertOptions(column_types=types,
                                                                         strings_can_be_null=False))
            for batch in reader:
                if k:
                    i = batch.schema.get_field_index("patient_id")
                    ids = pc.binary_join_element_wise(batch.column(i), pa.scalar(f"-t{k}"), "")
                    batch = batch.set_column(i, "patient_id", ids)
                writer.write_batch(batch)


if __name__ == "__main__":
    cohort_dir, out_dir, n = sys.argv[1:]
    print(tile_cohort(Path(cohort_dir), Path(out_dir), int(n)))
