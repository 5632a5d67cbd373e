"""The twin spec: which columns a twin forecasts, which treatments drive it, and its windows.

The spec is the contract between a site's export and the surrogate. It is a frozen pydantic
model with ``extra="forbid"``: a misspelt key in a spec file is an error, never a silent default.
Its numbers are strictly typed (``step_minutes = "5"`` or ``5.0`` is an error, not a 5), every
bound is finite and every count is bounded, so nothing downstream overflows.
"""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from twinfed.errors import SpecError

BUILTIN_TWINS = ("glucose", "cardio")
RESERVED_COLUMNS = ("patient_id", "time_min")
MAX_STEP_MINUTES = 7 * 24 * 60  # a week: a twin forecasts physiology, not seasons
MAX_STEPS = 100_000  # history, horizon or context: far beyond any window a node can hold

# Strict: TOML's "5", 5.0 or true where a number belongs is an error naming the key.
Bound = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Steps = Annotated[int, Field(strict=True, gt=0, le=MAX_STEPS)]


class Column(BaseModel):
    """One column of the export with its unit and the physiologically possible range."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    column: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
    unit: str = ""
    min: Bound
    max: Bound

    @model_validator(mode="after")
    def _range_is_ordered(self) -> Column:
        if not self.max > self.min:
            raise ValueError(f"column {self.column}: max ({self.max}) must be above min ({self.min})")
        return self


# The mechanistic cores a hybrid twin can use, and the roles each binds to spec columns
# (role -> the kind of column it must be). The maths lives in twinfed.models.cores.
CORE_ROLES: dict[str, dict[str, str]] = {
    "glucose-insulin": {"glucose": "state", "insulin": "control", "carbs": "control",
                        "weight": "covariate"},
    "cardio": {"sbp": "state", "hr": "state", "dose": "control", "activity": "control",
               "weight": "covariate", "age": "covariate"},
}
# Each core family's structures (the first is the family's default): structurally different models
# of the same physiology on the same roles. A twin may declare several (``structures``): it then
# is an ensemble, model-averaged, whose structures' disagreement widens every interval.
CORE_STRUCTURES: dict[str, tuple[str, ...]] = {
    "glucose-insulin": ("minimal", "two-compartment"),
    "cardio": ("effect-compartment", "indirect-response"),
}


class CoreSpec(BaseModel):
    """``[twin.core]``: which mechanistic core a hybrid twin uses, and which spec column plays
    each of its roles (e.g. ``glucose = "glucose_mgdl"``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    roles: dict[str, str]
    # The structures the twin runs, in order (None: the family's default alone). More than one:
    # an ensemble (see CORE_STRUCTURES).
    structures: Annotated[tuple[str, ...], Field(min_length=1)] | None = None

    @property
    def members(self) -> tuple[str, ...]:
        """The structures the twin runs (the family's default when none are declared)."""
        return self.structures or CORE_STRUCTURES[self.name][:1]

    @model_validator(mode="after")
    def _known_core_and_roles(self) -> CoreSpec:
        if self.name not in CORE_ROLES:
            raise ValueError(f"unknown core {self.name!r}; the cores are {', '.join(CORE_ROLES)}")
        if self.structures is not None:
            known = CORE_STRUCTURES[self.name]
            bad = [s for s in self.structures if s not in known]
            if bad:
                raise ValueError(f"core {self.name} has no structure {bad[0]!r}; its structures are "
                                 f"{', '.join(known)}")
            if len(set(self.structures)) != len(self.structures):
                raise ValueError(f"core {self.name}: structures must not repeat")
        need = CORE_ROLES[self.name]
        missing = sorted(set(need) - set(self.roles))
        unknown = sorted(set(self.roles) - set(need))
        if missing or unknown:
            raise ValueError(f"core {self.name} binds the roles {', '.join(need)}"
                             + (f"; missing {', '.join(missing)}" if missing else "")
                             + (f"; unknown {', '.join(unknown)}" if unknown else ""))
        return self


class TwinSpec(BaseModel):
    """What one kind of twin sees and forecasts (DESIGN.md section 3)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(min_length=1)]
    step_minutes: Annotated[int, Field(strict=True, gt=0, le=MAX_STEP_MINUTES)]
    history_steps: Steps
    horizon_steps: Steps
    purpose: Annotated[str, Field(min_length=1)]
    # How far back a hybrid twin looks to identify the patient (insulin on board, habits): at
    # least history_steps; windows still need only history_steps of contiguous record, and an
    # earlier start is read as "nothing recorded" (the core assumes its steady state).
    context_steps: Steps | None = None
    states: Annotated[tuple[Column, ...], Field(min_length=1)]
    controls: tuple[Column, ...] = ()
    covariates: tuple[Column, ...] = ()
    core: CoreSpec | None = None

    @model_validator(mode="after")
    def _columns_are_unique(self) -> TwinSpec:
        names = [c.column for c in (*self.states, *self.controls, *self.covariates)]
        for reserved in RESERVED_COLUMNS:
            if reserved in names:
                raise ValueError(f"column name {reserved!r} is reserved for the data contract")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"column names must be unique, repeated: {', '.join(dupes)}")
        if self.context_steps is not None and self.context_steps < self.history_steps:
            raise ValueError(f"context_steps ({self.context_steps}) must be at least history_steps "
                             f"({self.history_steps})")
        if self.core is not None:
            kinds = {"state": self.state_columns, "control": self.control_columns,
                     "covariate": self.covariate_columns}
            for role, kind in CORE_ROLES[self.core.name].items():
                if self.core.roles[role] not in kinds[kind]:
                    raise ValueError(f"core role {role} names {self.core.roles[role]!r}, which is not "
                                     f"one of the spec's {kind} columns")
        return self

    @property
    def state_columns(self) -> list[str]:
        return [c.column for c in self.states]

    @property
    def control_columns(self) -> list[str]:
        return [c.column for c in self.controls]

    @property
    def covariate_columns(self) -> list[str]:
        return [c.column for c in self.covariates]

    @property
    def timeseries_columns(self) -> list[str]:
        return [*self.state_columns, *self.control_columns]

    @property
    def window_steps(self) -> int:
        return self.history_steps + self.horizon_steps

    @property
    def context_length(self) -> int:
        """Steps of record a hybrid twin reads before the forecast origin (history included)."""
        return self.context_steps or self.history_steps

    @property
    def horizon_minutes(self) -> int:
        return self.horizon_steps * self.step_minutes

    def column(self, name: str) -> Column:
        for col in (*self.states, *self.controls, *self.covariates):
            if col.column == name:
                return col
        raise SpecError(f"twin {self.name!r} has no column {name!r}")

    def to_toml(self) -> str:
        """The spec as TOML text that :func:`load_spec` reads back to an equal spec."""

        def table(kind: str, cols: tuple[Column, ...]) -> str:
            out = []
            for c in cols:
                out.append(f"\n[[twin.{kind}]]\ncolumn = {_q(c.column)}\nunit = {_q(c.unit)}\n"
                           f"min = {c.min!r}\nmax = {c.max!r}\n")
            return "".join(out)

        head = (
            f"[twin]\nname = {_q(self.name)}\nstep_minutes = {self.step_minutes}\n"
            f"history_steps = {self.history_steps}\nhorizon_steps = {self.horizon_steps}\n"
            f"purpose = {_q(self.purpose)}\n"
            + (f"context_steps = {self.context_steps}\n" if self.context_steps is not None else "")
        )
        core = ""
        if self.core is not None:
            members = "" if self.core.structures is None else \
                "structures = [" + ", ".join(_q(m) for m in self.core.structures) + "]\n"
            core = f"\n[twin.core]\nname = {_q(self.core.name)}\n{members}\n[twin.core.roles]\n" + "".join(
                f"{role} = {_q(col)}\n" for role, col in self.core.roles.items())
        return head + table("states", self.states) + table("controls", self.controls) + table(
            "covariates", self.covariates) + core


def _q(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def parse_spec(text: str, *, source: str = "spec") -> TwinSpec:
    """Parse TOML text with one ``[twin]`` table into a validated spec."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{source}: not valid TOML ({exc}); fix the file's syntax") from None
    unknown = sorted(set(doc) - {"twin"})
    if unknown:
        raise SpecError(f"{source}: unknown top-level table(s) {', '.join(unknown)}; "
                        "a spec has only [twin]")
    if "twin" not in doc:
        raise SpecError(f"{source}: no [twin] table; see the data contract in README.md")
    try:
        return TwinSpec.model_validate(doc["twin"])
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in ("twin", *err["loc"]))
        msg = _MESSAGES[err["type"]].format(**err.get("ctx", {})) if err["type"] in _MESSAGES \
            else err["msg"].replace("Input should be", "must be", 1).removeprefix("Value error, ")
        raise SpecError(f"{source}: {where}: {msg}") from None


# pydantic's error types in the words of a spec's author (others keep pydantic's message)
_MESSAGES = {
    "extra_forbidden": "unknown key (a typo?); remove it or fix its name",
    "missing": "required key is missing",
    "int_type": "must be a whole number (write 5, not \"5\" or 5.0)",
    "float_type": "must be a number (write 2.5, not \"2.5\")",
    "finite_number": "must be a finite number (not inf or nan)",
    "string_type": "must be text in double quotes",
    "less_than_equal": "must be at most {le}",
}


def load_spec(path_or_name: str | Path) -> TwinSpec:
    """Load a spec from a TOML file, or a built-in twin by name (``glucose``, ``cardio``)."""
    text_name = str(path_or_name)
    if text_name in BUILTIN_TWINS:
        text = resources.files("twinfed.models").joinpath("specs", f"{text_name}.toml").read_text()
        return parse_spec(text, source=f"built-in spec {text_name}")
    path = Path(path_or_name)
    if not path.is_file():
        raise SpecError(f"spec {path}: no such file; give a spec TOML file or one of "
                        f"{', '.join(BUILTIN_TWINS)}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM from a Windows editor is fine
    except UnicodeDecodeError:
        raise SpecError(f"spec {path}: not UTF-8 text; save the spec as UTF-8") from None
    except OSError as exc:
        raise SpecError(f"spec {path}: cannot read it ({exc.strerror or exc}); check its "
                        "permissions") from None
    return parse_spec(text, source=str(path))
