"""The documents twinfed writes for people and programs: a study's ``summary.json`` (its round
records and its sites' spend) and a trial's ``trial.json`` (what ``twinfed trial --json`` prints).

Torch-free pydantic models. Fields are only ever added, never renamed; a document may carry
fields a later version added (``extra="allow"``), so an older reader still reads a newer file.

A site's **spend** is always the site's whole privacy ledger (every study and trial it took part
in), at the delta of the figure, as ``twinfed ledger show`` reports it; :class:`SiteSpend` breaks
it down by kind of release. Epsilons compose (RDP), they do not add: each kind's part is what its
releases *added* to the site's total when they were made, in ledger order, so the parts sum to the
total (:func:`attribute`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, PrivateAttr, model_validator

# The kinds of release a site's spend is made of: a study's training rounds (DP-SGD), its release
# of the noisy patient counts, its calibration histogram, and an in-silico trial's aggregates (the
# last two Gaussian sums). "earlier": releases made before this study, as its coordinator sees
# them (it is not told what they were).
SpendKind = Literal["training", "count", "calibration", "trial", "earlier"]
Mechanism = Literal["dp-sgd", "gaussian-count", "gaussian-sum"]
KIND_MECHANISM: dict[str, str | None] = {"training": "dp-sgd", "count": "gaussian-count",
                                         "calibration": "gaussian-sum", "trial": "gaussian-sum",
                                         "earlier": None}
KIND_ORDER = tuple(KIND_MECHANISM)


class _Doc(BaseModel):
    """A document: its declared fields typed, any other kept; written back in the order read."""

    model_config = ConfigDict(extra="allow")
    _order: list[str] = PrivateAttr(default_factory=list)

    @model_validator(mode="wrap")
    @classmethod
    def _keep_order(cls, data, handler):
        doc = handler(data)
        if isinstance(data, dict):
            doc._order = list(data)
        return doc

    def document(self) -> dict:
        """The document as JSON-ready Python values: every field it was given, in its order."""
        dumped = self.model_dump(exclude_unset=True)
        return {k: dumped[k] for k in self._order if k in dumped} | dumped

    def to_json(self) -> str:
        return json.dumps(self.document(), indent=2) + "\n"


class SpendPart(BaseModel):
    """What one kind of release added to the site's total."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: SpendKind
    mechanism: Mechanism | None  # None for "earlier": any
    epsilon: float
    releases: int  # how many releases (ledger segments) of this kind; 0 when not known


class SiteSpend(BaseModel):
    """A site's privacy spend: its ledger's total at ``delta``, and its parts by kind."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epsilon: float
    delta: float
    epsilon_budget: float | None = None
    accountant: Literal["rdp", "prv"] = "rdp"
    by_kind: list[SpendPart]
    source: str  # where the figures come from (the node's ledger, or the figures it released)

    def label(self) -> str:
        """One line: the total and its parts, e.g. ``epsilon 2.993 of 3 (training 2.1, ...)``."""
        budget = "" if self.epsilon_budget is None else f" of {self.epsilon_budget:g}"
        parts = ", ".join(f"{p.kind} {p.epsilon:.3f}" for p in self.by_kind if p.releases or p.epsilon)
        return f"epsilon {self.epsilon:.3f}{budget} at delta {self.delta:.2g}" + (f" ({parts})" if parts else "")


def attribute(labelled: Sequence[tuple[str, Any]], epsilon_of: Callable[[list], float]) -> list[SpendPart]:
    """Each kind's part of the total epsilon of ``labelled`` (``(kind, segment)`` in ledger order):
    the increase of ``epsilon_of`` over the segments so far that its releases made. The parts
    sum to ``epsilon_of`` of them all (up to rounding)."""
    eps: dict[str, float] = {}
    count: dict[str, int] = {}
    done: list = []
    before = 0.0
    i = 0
    while i < len(labelled):  # one accountant call per run of one kind, not per release
        kind = labelled[i][0]
        j = i
        while j < len(labelled) and labelled[j][0] == kind:
            done.append(labelled[j][1])
            j += 1
        after = epsilon_of(list(done))
        eps[kind] = eps.get(kind, 0.0) + (after - before)
        count[kind] = count.get(kind, 0) + (j - i)
        before, i = after, j
    return [SpendPart(kind=k, mechanism=KIND_MECHANISM[k], epsilon=eps[k], releases=count[k])
            for k in KIND_ORDER if k in eps]


class RoundRecord(_Doc):
    """One round of a study (or a release round) as the coordinator saw it."""

    round: int
    sites_trained: int
    sites_refused: int
    failures: int
    update_norm: float | None
    skipped: bool
    seconds: float
    secagg: dict[str, int] | None = None
    skip_code: str | None = None


class SiteEntry(_Doc):
    """A site in ``summary.json``: only what it released. ``privacy`` is the study's own figures as
    the site released them with its last round (``privacy.epsilon``: this study's releases alone,
    before its calibration); ``epsilon_spent`` and ``spend`` are the site's whole ledger."""

    patients_used: int | None
    patients_excluded: int | None
    rounds_joined: int
    rounds_refused: int
    refusals: list[dict]
    privacy: dict | None
    release: dict[str, str]
    epsilon_spent: float | None = None
    epsilon_budget: float | None = None
    spend: SiteSpend | None = None


class CalibrationRecord(_Doc):
    round: int
    sites_released: int
    sites: dict[str, dict]
    releases: dict[str, dict]
    history: dict
    note: str | None = None


class StudySummary(_Doc):
    """``summary.json``."""

    twin: str
    plan_sha256: str
    rounds: int
    rounds_with_update: int
    skipped_rounds: list[int]
    strategy: str
    privacy: dict
    model: dict
    sites: dict[str, SiteEntry]
    history: list[RoundRecord]
    intervals: Any = None
    model_dir: str
    seconds: float
    calibration: CalibrationRecord | None = None
    engine: str | None = None



class TrialReport(_Doc):
    """``trial.json``, and what ``twinfed trial --json`` prints: the same document."""

    trial: str
    n_patients: int
    arms: dict
    contrasts: dict
    plan_sha256: str | None = None
    privacy: dict | None = None
    sites: dict[str, dict] | None = None
    sites_released: int | None = None
    model: dict | None = None

