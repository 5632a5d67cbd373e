"""An in-silico trial's design: its arms file, each arm's controls, and the outcomes it compares.

A trial runs several treatment *arms* on every patient's twin from ``start_hours`` after the
patient's first row for ``duration_days``, and compares outcomes per patient against the
``reference`` arm. Users write the design as TOML (``examples/trials/``)::

    [trial]
    name = "carb-ratio-10"
    purpose = "in-silico-trial"
    reference = "usual-care"
    start_hours = 48
    duration_days = 7
    outcomes = ["time_in_range", "mean_glucose"]

    [[trial.arms]]
    name = "usual-care"

    [[trial.arms]]
    name = "ratio-10"
    rule = { kind = "meal-bolus", insulin = "insulin_u", carbs = "carbs_g", grams_per_unit = 10.0 }

Guarantees:

- :func:`parse_design` either returns a design that is valid *for the spec given* (every column a
  control or state of the spec, every time on its step grid, every scenario parseable) or raises
  one :class:`~twinfed.errors.TrialError` line naming the file and the key path
  (``arms.toml: trial.arms[2].rule.grams_per_unit: must be above 0``); list indices count from 0.
  Unknown keys are errors, numbers are strict (``"7"``, ``true`` and ``7.0`` for a count are
  errors) and finite.
- A design is self-contained: built-in outcomes are stored resolved (the spec's column, the
  thresholds, the DP clipping bounds), so its canonical JSON says everything a trial computes.
- :func:`arm_controls` returns controls inside the spec's ranges or raises; :func:`outcome_values`
  is a pure function of the trajectories. Neither logs nor returns anything but arrays, and error
  messages never carry a patient's values.

numpy and pydantic only: governance and the coordinator read designs without torch.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (BaseModel, ConfigDict, Field, PlainValidator, ValidationError, ValidationInfo,
                      model_validator)
from pydantic_core import PydanticCustomError

from twinfed.errors import ScenarioError, TrialError
from twinfed.models.spec import TwinSpec
from twinfed.models.whatif import Scenario, parse_scenario

MAX_DURATION_DAYS = 90
MAX_DRAWS = 256
# Every arm and outcome costs roll-forwards and DP releases; far more than a trial compares.
MAX_ARMS = 64
MAX_OUTCOMES = 64
MINUTES_PER_DAY = 1440

PlainName = Annotated[str, Field(strict=True, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
ColumnName = Annotated[str, Field(strict=True, min_length=1)]
# Strict: TOML's "7" or true where a number belongs is an error naming the key (ints are numbers).
Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Positive = Annotated[float, Field(strict=True, allow_inf_nan=False, gt=0)]
OutcomeKind = Literal["mean", "percent_between", "percent_below", "percent_above"]
PERCENT_KINDS = ("percent_between", "percent_below", "percent_above")


def _at(key: str, message: str) -> PydanticCustomError:
    """A validator's error at ``key`` below the model it validates (the parser adds it to the
    path), so cross-field errors still name the key to fix."""
    return PydanticCustomError("at_key", "{message}", {"key": key, "message": message})


def _spec(info: ValidationInfo) -> TwinSpec | None:
    """The spec a design is validated against (``context={"spec": spec}``); without one only the
    checks that need no spec run."""
    return (info.context or {}).get("spec")


def _on_grid(minutes: float, step: int) -> bool:
    # Within 0.06 s of a whole minute: a third of a day written as 0.3333333 is 480 minutes.
    return abs(minutes - round(minutes)) < 1e-3 and round(minutes) % step == 0


# -- outcomes --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Builtin:
    """A built-in outcome, bound to a spec column through the core's ``role``."""

    role: str
    kind: str
    low: float | None = None
    high: float | None = None
    bounds: tuple[float, float] = (0.0, 100.0)
    contrast_bound: float = 100.0
    description: str = ""


BUILTIN_OUTCOMES: dict[str, Builtin] = {
    "time_in_range": Builtin("glucose", "percent_between", low=70.0, high=180.0,
                             description="percent of time with 70 <= glucose <= 180 mg/dL"),
    "time_below_70": Builtin("glucose", "percent_below", low=70.0,
                             description="percent of time with glucose < 70 mg/dL"),
    "time_above_180": Builtin("glucose", "percent_above", high=180.0,
                              description="percent of time with glucose > 180 mg/dL"),
    "mean_glucose": Builtin("glucose", "mean", bounds=(40.0, 400.0), contrast_bound=100.0,
                            description="mean glucose (mg/dL)"),
    "mean_sbp": Builtin("sbp", "mean", bounds=(80.0, 220.0), contrast_bound=40.0,
                        description="mean systolic blood pressure (mmHg)"),
    "time_above_140": Builtin("sbp", "percent_above", high=140.0,
                              description="percent of time with systolic pressure > 140 mmHg"),
    "mean_hr": Builtin("hr", "mean", bounds=(40.0, 160.0), contrast_bound=30.0,
                       description="mean heart rate (1/min)"),
}


def _builtin(name: str, spec: TwinSpec | None) -> dict:
    """The built-in outcome ``name`` resolved against the spec's core roles, as an outcome table."""
    if name not in BUILTIN_OUTCOMES:
        raise _at("", f"unknown outcome {name!r}; the built-in outcomes are "
                      f"{', '.join(BUILTIN_OUTCOMES)}, or define one as a table with name, state "
                      "and kind")
    b = BUILTIN_OUTCOMES[name]
    if spec is None:
        raise _at("", f"the built-in outcome {name} needs a twin spec to resolve its column")
    roles = spec.core.roles if spec.core is not None else {}
    if b.role not in roles:
        fitting = [n for n, o in BUILTIN_OUTCOMES.items() if o.role in roles]
        hint = (f"this twin's built-in outcomes are {', '.join(fitting)}" if fitting
                else "define the outcome as a table with name, state and kind")
        raise _at("", f"{name} needs a twin whose core binds a {b.role} column; twin {spec.name!r} "
                      f"has none; {hint}")
    return {"name": name, "state": roles[b.role], "kind": b.kind, "low": b.low, "high": b.high,
            "bounds": b.bounds, "contrast_bound": b.contrast_bound}


class OutcomeSpec(BaseModel):
    """One outcome per patient and arm over the trial's steps: the ``mean`` of a state, or the
    percent of steps with ``low <= x <= high`` (``percent_between``), ``x < low``
    (``percent_below``) or ``x > high`` (``percent_above``).

    ``bounds`` is what each patient's value is clipped to for a DP release, ``contrast_bound`` what
    a patient's paired difference between two arms is clipped to (``[-B, B]``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: PlainName
    state: ColumnName
    kind: OutcomeKind
    low: Number | None = None
    high: Number | None = None
    # None only while parsing: filled from the kind (percent: [0, 100]) or the spec (mean).
    bounds: tuple[Number, Number] | None = None
    contrast_bound: Positive | None = None

    @model_validator(mode="before")
    @classmethod
    def _resolve(cls, data: Any, info: ValidationInfo) -> Any:
        spec = _spec(info)
        if isinstance(data, str):
            return _builtin(data, spec)
        if not isinstance(data, dict):
            if isinstance(data, OutcomeSpec):
                return data
            raise _at("", "must be a built-in outcome name in double quotes or a table")
        if spec is not None and isinstance(data.get("state"), str):
            if data["state"] not in spec.state_columns:
                raise _at("state", f"{data['state']!r} is not a state of twin {spec.name!r} "
                                   f"(states: {', '.join(spec.state_columns)})")
            if data.get("kind") == "mean" and data.get("bounds") is None:
                col = spec.column(data["state"])
                data = data | {"bounds": (col.min, col.max)}
        return data

    @model_validator(mode="after")
    def _thresholds_fit_the_kind(self) -> OutcomeSpec:
        need = {"mean": (), "percent_between": ("low", "high"), "percent_below": ("low",),
                "percent_above": ("high",)}[self.kind]
        for key in ("low", "high"):
            given = getattr(self, key) is not None
            if key in need and not given:
                raise _at(key, f"required by kind {self.kind}")
            if key not in need and given:
                raise _at(key, f"not used by kind {self.kind}; remove it")
        if self.kind == "percent_between" and not self.low < self.high:
            raise _at("high", f"must be above low ({self.low:g})")
        bounds = self.bounds
        if bounds is None:
            if self.kind != "mean":
                bounds = (0.0, 100.0)
            else:
                raise _at("bounds", "required for a mean outside a twin spec (the state's range)")
        if not bounds[0] < bounds[1]:
            raise _at("bounds", f"must be [lo, hi] with lo below hi, not [{bounds[0]:g}, {bounds[1]:g}]")
        # Frozen: resolved once here so the canonical JSON names the bounds every release uses.
        object.__setattr__(self, "bounds", (float(bounds[0]), float(bounds[1])))
        if self.contrast_bound is None:
            object.__setattr__(self, "contrast_bound", float(bounds[1] - bounds[0]))
        return self


# -- arms ------------------------------------------------------------------------------------------


def _basal(value: Any) -> float | str:
    # One plain validator instead of a union, so a wrong value gets one message, not two.
    if value == "recorded" and isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PydanticCustomError("basal", 'must be a number of U/h (e.g. 0.9) or "recorded"')
    if not math.isfinite(value) or value < 0:
        raise PydanticCustomError("basal", "must be a finite number of U/h, at least 0")
    return float(value)


class MealBolus(BaseModel):
    """Insulin at every step = basal + carbohydrate eaten in the step / ``grams_per_unit``,
    replacing the recorded insulin. ``basal_u_per_h = "recorded"``: each patient's own basal,
    read off their record before the trial (see :func:`arm_controls`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["meal-bolus"]
    insulin: ColumnName
    carbs: ColumnName
    grams_per_unit: Positive
    basal_u_per_h: Annotated[float | str, PlainValidator(_basal)] = "recorded"

    @model_validator(mode="after")
    def _columns_are_controls(self, info: ValidationInfo) -> MealBolus:
        if self.insulin == self.carbs:
            raise _at("carbs", "must be another control than insulin")
        spec = _spec(info)
        if spec is not None:
            for key in ("insulin", "carbs"):
                _check_control(spec, key, getattr(self, key))
        return self


class DailyDose(BaseModel):
    """The control is ``amount`` at ``times_min`` minutes into every trial day and 0 at every
    other step: it replaces the recorded dosing."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["daily-dose"]
    control: ColumnName
    amount: Number
    times_min: Annotated[tuple[Annotated[int, Field(strict=True, ge=0, lt=MINUTES_PER_DAY)], ...],
                         Field(min_length=1, max_length=MINUTES_PER_DAY)]

    @model_validator(mode="after")
    def _on_the_spec(self, info: ValidationInfo) -> DailyDose:
        seen = set()
        for i, m in enumerate(self.times_min):
            if m in seen:
                raise _at(f"times_min[{i}]", f"minute {m} is listed twice")
            seen.add(m)
        spec = _spec(info)
        if spec is not None:
            col = _check_control(spec, "control", self.control)
            for i, m in enumerate(self.times_min):
                if m % spec.step_minutes:
                    raise _at(f"times_min[{i}]", f"minute {m} is not a multiple of the twin's step "
                                                 f"({spec.step_minutes} min)")
            if not col.min <= self.amount <= col.max:
                raise _at("amount", f"must be within {self.control}'s range [{col.min:g}, "
                                    f"{col.max:g}] {col.unit}".rstrip())
        return self


def _check_control(spec: TwinSpec, key: str, column: str):
    if column not in spec.control_columns:
        raise _at(key, f"{column!r} is not a control of twin {spec.name!r} "
                       f"(controls: {', '.join(spec.control_columns) or 'none'})")
    return spec.column(column)


Rule = Annotated[MealBolus | DailyDose, Field(discriminator="kind")]


class Arm(BaseModel):
    """One treatment arm: an optional rule that replaces a control, then what-if scenario
    operations (``twinfed.models.whatif``) on the result; ``recorded`` and no rule is usual care."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: PlainName
    scenario: Annotated[str, Field(strict=True, min_length=1)] = "recorded"
    rule: Rule | None = None

    def parsed_scenario(self, spec: TwinSpec) -> Scenario:
        """The arm's scenario; a :class:`TrialError` naming the arm if it does not parse."""
        try:
            return parse_scenario(f"{self.name}={self.scenario}", spec)
        except ScenarioError as exc:
            raise TrialError(f"arm {self.name}: {_scenario_reason(self, exc)}") from None

    @model_validator(mode="after")
    def _scenario_parses(self, info: ValidationInfo) -> Arm:
        spec = _spec(info)
        if spec is not None:
            try:
                parse_scenario(f"{self.name}={self.scenario}", spec)
            except ScenarioError as exc:
                raise _at("scenario", f"arm {self.name}: {_scenario_reason(self, exc)}") from None
        return self


def _scenario_reason(arm: Arm, exc: ScenarioError) -> str:
    return str(exc).removeprefix(f"scenario {arm.name}: ")


# -- the design ------------------------------------------------------------------------------------


class TrialDesign(BaseModel):
    """``[trial]`` of an arms file: what the trial runs, on which consent purpose, and what it
    compares. Validate with ``context={"spec": spec}`` (as :func:`parse_design` does) for the
    checks against the twin."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: PlainName
    purpose: Annotated[str, Field(strict=True, min_length=1)]
    reference: Annotated[str, Field(strict=True)]
    start_hours: Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0, le=24 * 366 * 10)]
    duration_days: Annotated[float, Field(strict=True, allow_inf_nan=False, gt=0,
                                          le=MAX_DURATION_DAYS)]
    outcomes: Annotated[tuple[OutcomeSpec, ...], Field(min_length=1, max_length=MAX_OUTCOMES)]
    arms: Annotated[tuple[Arm, ...], Field(max_length=MAX_ARMS)]
    draws: Annotated[int, Field(strict=True, ge=1, le=MAX_DRAWS)] = 8
    seed: Annotated[int, Field(strict=True, ge=0, lt=2**63)] = 0

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> TrialDesign:
        names = [a.name for a in self.arms]
        if len(names) < 2:
            raise _at("arms", "a trial compares at least 2 arms (the reference and another); "
                              "add a [[trial.arms]] table")
        for i, name in enumerate(names):
            if name in names[:i]:
                raise _at(f"arms[{i}].name", f"arm {name} is named twice; arm names must be unique")
        if self.reference not in names:
            raise _at("reference", f"{self.reference!r} is not one of the arms ({', '.join(names)})")
        outcomes = [o.name for o in self.outcomes]
        for i, name in enumerate(outcomes):
            if name in outcomes[:i]:
                raise _at(f"outcomes[{i}]", f"outcome {name} is listed twice")
        spec = _spec(info)
        if spec is not None:
            step = spec.step_minutes
            if not _on_grid(self.start_hours * 60, step):
                raise _at("start_hours", f"{self.start_hours:g} h is not on the twin's {step}-min "
                                         "step grid; choose a multiple of the step")
            span = self.duration_days * MINUTES_PER_DAY
            if not _on_grid(span, step):
                raise _at("duration_days", f"{self.duration_days:g} days is not a whole number of "
                                           f"the twin's {step}-min steps")
            for i, arm in enumerate(self.arms):
                for op in parse_scenario(f"{arm.name}={arm.scenario}", spec).ops:
                    if op.minute is not None and (op.minute % step or op.minute >= span):
                        raise _at(f"arms[{i}].scenario", (
                            f"arm {arm.name}: minute {op.minute} must be a multiple of {step} below "
                            f"{round(span)} min (minutes count from the trial's start)"))
        return self

    def arm(self, name: str) -> Arm:
        for a in self.arms:
            if a.name == name:
                return a
        raise TrialError(f"trial {self.name}: no arm {name!r}; the arms are "
                         f"{', '.join(a.name for a in self.arms)}")

    def steps(self, spec: TwinSpec) -> tuple[int, int]:
        """``(start_steps, duration_steps)`` on the spec's grid."""
        step = spec.step_minutes
        start, span = self.start_hours * 60, self.duration_days * MINUTES_PER_DAY
        if not (_on_grid(start, step) and _on_grid(span, step)):
            raise TrialError(f"trial {self.name}: start_hours and duration_days must be on twin "
                             f"{spec.name!r}'s {step}-min step grid")
        return round(start) // step, round(span) // step

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


# -- parsing ---------------------------------------------------------------------------------------


def parse_design(text: str, spec: TwinSpec, *, source: str = "arms file") -> TrialDesign:
    """Parse TOML text with one ``[trial]`` table into a design checked against ``spec``."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TrialError(f"{source}: not valid TOML ({exc}); fix the file's syntax") from None
    unknown = sorted(set(doc) - {"trial"})
    if unknown:
        raise TrialError(f"{source}: unknown top-level key(s) {', '.join(unknown)}; an arms file "
                         "has only [trial] (a typo? put trial settings under [trial])")
    if "trial" not in doc:
        raise TrialError(f"{source}: no [trial] table; see examples/trials/ for an arms file")
    return validate_design(doc["trial"], spec, source=source)


def validate_design(data: Any, spec: TwinSpec, *, source: str = "arms file") -> TrialDesign:
    """A design from the ``[trial]`` table's data (or a stored design's dict), checked against
    ``spec``; a one-line :class:`TrialError` otherwise."""
    try:
        return TrialDesign.model_validate(data, context={"spec": spec})
    except ValidationError as exc:
        # An unknown key first: a misspelt key also shows up as the real one missing.
        errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
        raise TrialError(f"{source}: {_describe(errors[0])}") from None


def load_design(path: str | Path, spec: TwinSpec) -> TrialDesign:
    """Read an arms file (UTF-8, a BOM is fine) and :func:`parse_design` it."""
    path = Path(path)
    if not path.is_file():
        raise TrialError(f"arms file {path}: no such file; give the trial's arms TOML file "
                         "(see examples/trials/)")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM from a Windows editor is fine
    except UnicodeDecodeError:
        raise TrialError(f"arms file {path}: not UTF-8 text; save it as UTF-8") from None
    except OSError as exc:
        raise TrialError(f"arms file {path}: cannot read it ({exc.strerror or exc}); check its "
                         "permissions") from None
    return parse_design(text, spec, source=str(path))


# pydantic's error types in the words of an arms file's author (others keep pydantic's message)
_MESSAGES = {
    "extra_forbidden": "unknown key (a typo?); remove it or fix its name",
    "missing": "required key is missing",
    "int_type": "must be a whole number (write 8, not \"8\", 8.0 or true)",
    "int_from_float": "must be a whole number (write 8, not 8.0)",
    "float_type": "must be a number (write 2.5, not \"2.5\" or true)",
    "finite_number": "must be a finite number (not inf or nan)",
    "string_type": "must be text in double quotes",
    "string_too_short": "must not be empty",
    "string_pattern_mismatch": ("must be a plain name: a letter or digit, then up to 63 letters, "
                                "digits, '.', '_' or '-'"),
    "greater_than": "must be above {gt}",
    "greater_than_equal": "must be at least {ge}",
    "less_than": "must be below {lt}",
    "less_than_equal": "must be at most {le}",
    "literal_error": "must be one of {expected}",
    "tuple_type": "must be a list in square brackets",
    "too_short": "needs at least {min_length} item(s)",
    "too_long": "has too many items (at most {max_length})",
    "model_type": "must be a table",
    "model_attributes_type": "must be a table",
    "union_tag_invalid": "unknown kind {tag!r}; the kinds are {expected_tags}",
    "union_tag_not_found": "required key is missing (the kinds are meal-bolus, daily-dose)",
}
_RULE_TAGS = ("meal-bolus", "daily-dose")


def _describe(err: dict) -> str:
    """``trial.arms[2].rule.grams_per_unit: must be above 0`` from one pydantic error."""
    ctx = {k: f"{v:g}" if isinstance(v, float) else v for k, v in (err.get("ctx") or {}).items()}
    loc = [p for p in err["loc"] if p not in _RULE_TAGS]  # the union's tag is not a key
    if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
        loc.append("kind")
    if err["type"] == "at_key" and ctx["key"]:
        loc.append(ctx["key"])
    short = err["type"] == "missing" and loc and isinstance(loc[-1], int)
    if short:  # a fixed-length list (bounds) with an item missing, not a missing key
        loc.pop()
    where = "trial"
    for p in loc:
        where += f"[{p}]" if isinstance(p, int) else f".{p}"
    if err["type"] == "at_key":
        msg = ctx["message"]
    elif short:
        msg = "has too few items" + (" (write [lo, hi])" if loc[-1] == "bounds" else "")
    elif err["type"] in _MESSAGES:
        msg = _MESSAGES[err["type"]].format(**ctx)
    else:
        msg = err["msg"].replace("Input should be", "must be", 1).removeprefix("Value error, ")
    return f"{where}: {msg}"


# -- controls and outcomes -------------------------------------------------------------------------


def arm_controls(design: TrialDesign, arm: Arm, spec: TwinSpec, base: np.ndarray,
                 recorded_before: np.ndarray, *, strict: bool = True) -> np.ndarray:
    """The arm's controls ``[P, T, C]`` float32 over the trial.

    ``base`` ``[P, T, C]``: the patients' usual-care controls over the trial (``T`` = the
    duration's steps, spec control order); ``recorded_before`` ``[P, L, C]``: their recorded
    controls over the ``L`` steps before the start (``L`` may be 0; NaN marks an unrecorded step;
    a meal-bolus basal "recorded" falls back to ``base`` for a patient with no recorded step).
    The rule applies first, to ``base``; then the scenario's operations, whose ``@MIN`` counts from
    the trial's start. A scenario on a control a rule derives from (carbs under meal-bolus) does
    not re-dose: the rule saw the usual-care amounts. A result outside the spec's control ranges
    is a :class:`TrialError` naming the arm (``strict=False``: returned as is, for the caller to
    tell which patients left the range, :func:`controls_in_range`)."""
    _, duration = design.steps(spec)
    c = len(spec.controls)
    base = np.asarray(base)
    before = np.asarray(recorded_before)
    if base.ndim != 3 or base.shape[1:] != (duration, c):
        raise TrialError(f"arm {arm.name}: usual-care controls have shape {base.shape}, expected "
                         f"[patients, {duration}, {c}] (the trial's steps, the spec's controls)")
    if before.ndim != 3 or before.shape[0] != base.shape[0] or before.shape[2] != c:
        raise TrialError(f"arm {arm.name}: recorded controls before the start have shape "
                         f"{before.shape}, expected [{base.shape[0]}, steps, {c}]")
    if not np.isfinite(base).all():
        raise TrialError(f"arm {arm.name}: usual-care controls over the trial have missing (NaN) "
                         "steps; the trial needs every step's controls")
    out = base.astype(np.float64, copy=True)
    if isinstance(arm.rule, MealBolus):
        out = _meal_bolus(arm.rule, spec, out, before.astype(np.float64))
    elif isinstance(arm.rule, DailyDose):
        out = _daily_dose(arm.rule, spec, out)
    try:
        out = arm.parsed_scenario(spec).apply(spec, out, check_range=strict)
    except ScenarioError as exc:
        raise TrialError(f"arm {arm.name}: {_scenario_reason(arm, exc)}") from None
    out = out.astype(np.float32)
    if strict:
        for j, col in enumerate(spec.controls):
            if (out[..., j] < col.min).any() or (out[..., j] > col.max).any():
                raise TrialError(f"arm {arm.name}: {col.column} leaves the spec's range [{col.min:g}, "
                                 f"{col.max:g}] {col.unit} at some step; choose a smaller change"
                                 + (" or a larger grams_per_unit" if isinstance(arm.rule, MealBolus) else ""))
    return out


def controls_in_range(controls: np.ndarray, spec: TwinSpec) -> np.ndarray:
    """``[P]``: whether each patient's controls ``[..., P, T, C]`` stay inside the spec's control
    ranges at every step (of every arm, when arms lead)."""
    controls = np.asarray(controls)
    lo = np.array([c.min for c in spec.controls], dtype=np.float64)
    hi = np.array([c.max for c in spec.controls], dtype=np.float64)
    inside = (controls >= lo) & (controls <= hi)  # [..., P, T, C]
    inside = inside.all(axis=(-1, -2))
    return inside.reshape(-1, inside.shape[-1]).all(axis=0)


def _meal_bolus(rule: MealBolus, spec: TwinSpec, out: np.ndarray, before: np.ndarray) -> np.ndarray:
    cols = spec.control_columns
    i, k = cols.index(rule.insulin), cols.index(rule.carbs)
    if rule.basal_u_per_h == "recorded":
        # The basal is the floor under the boluses: the 10th percentile of the delivered insulin
        # per step ignores meal and correction boluses, which are far fewer than 90% of steps.
        basal = np.percentile(out[..., i], 10, axis=1)
        recorded = before[..., i]
        known = np.isfinite(recorded).any(axis=1)
        if known.any():
            basal[known] = np.nanpercentile(recorded[known], 10, axis=1)
    else:
        basal = np.full(out.shape[0], rule.basal_u_per_h * spec.step_minutes / 60)
    out[..., i] = basal[:, None] + out[..., k] / rule.grams_per_unit
    return out


def _daily_dose(rule: DailyDose, spec: TwinSpec, out: np.ndarray) -> np.ndarray:
    j = spec.control_columns.index(rule.control)
    per_day = MINUTES_PER_DAY // spec.step_minutes
    t = out.shape[1]
    steps = [d * per_day + m // spec.step_minutes for d in range(-(-t // per_day))
             for m in rule.times_min]
    out[..., j] = 0.0
    out[:, [s for s in steps if s < t], j] = rule.amount
    return out


def outcome_values(design: TrialDesign, spec: TwinSpec, states: np.ndarray) -> np.ndarray:
    """``states`` ``[..., T, S]`` (spec state order) -> ``[..., O]`` float64, in
    ``design.outcomes`` order: the mean over the ``T`` steps, or 100 x the fraction of them
    inside the outcome's thresholds. A trajectory with a NaN step gives NaN (never a silently
    smaller percent)."""
    states = np.asarray(states, dtype=np.float64)
    if states.ndim < 2 or states.shape[-1] != len(spec.states) or states.shape[-2] < 1:
        raise TrialError(f"trial {design.name}: trajectories have shape {states.shape}, expected "
                         f"[..., steps, {len(spec.states)}] (the spec's states)")
    out = np.empty((*states.shape[:-2], len(design.outcomes)), np.float64)
    for o, outcome in enumerate(design.outcomes):
        if outcome.state not in spec.state_columns:
            raise TrialError(f"trial {design.name}: outcome {outcome.name} reads {outcome.state!r}, "
                             f"which is not a state of twin {spec.name!r}")
        x = states[..., spec.state_columns.index(outcome.state)]
        if outcome.kind == "mean":
            out[..., o] = x.mean(axis=-1)
            continue
        if outcome.kind == "percent_between":
            hit = (x >= outcome.low) & (x <= outcome.high)
        elif outcome.kind == "percent_below":
            hit = x < outcome.low
        else:
            hit = x > outcome.high
        value = 100.0 * hit.mean(axis=-1)
        out[..., o] = np.where(np.isnan(x).any(axis=-1), np.nan, value)
    return out
