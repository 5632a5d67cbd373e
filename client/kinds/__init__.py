"""What a node can release, one module per kind; the rules every release obeys live in the one
session that runs them (:func:`twinfed.client.gate.serve`), not here.

A kind supplies only what is its own:

- its **instruction** (the config key and model the coordinator sends it under) and **plan**
  (how the instruction's plan text parses; the shape of the zeros a refusal keeps);
- its **admission checks**: on the plan alone (``check_plan``), on the node's verified log once
  the plan is known to be approved (``admit``) and again under the state lock (``recheck``);
- the **patients** it reads (``load``);
- its **ledger segment** (``segment``: what the release costs and at which delta) and, once the
  session charged it, the release's privacy figures (``charged``);
- its **computation** (``compute``: the update that leaves, clipped; noised when DP) and its
  **record** (the node's own audit entry with the exact figures) and **reply** (``released``).

The session does the rest, in order, for every kind: parse the instruction (a malformed one is
refused and audited), log what was received, check the plan's canonical hash, the protections
(DP at a deployed node, SecAgg+ as the plan requires), that the log was not rolled back, that
the plan is approved (before any patient is read, and again under the lock), the budget's delta,
the charge before any computation, the audit before anything is sent, and one coded refusal for
anything that stops it. A new kind is one module here and one line in :func:`kind_for`.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from twinfed.client.node import NodeConfig
from twinfed.wire import TRIAL_KEY, Released


class ReleaseKind:
    """One admitted release in the making at a node: created by the session once the plan parsed
    and hashed to the instruction's hash; its methods are called in the session's order."""

    key: ClassVar[str]  # the instruction's config key
    instruction_model: ClassVar[type]  # what is sent under it (twinfed.wire)
    name: ClassVar[str]  # what the node's console calls it

    def __init__(self, node: NodeConfig, plan, instruction, weights: list[np.ndarray]):
        self.node = node
        self.plan = plan
        self.instruction = instruction
        self.weights = weights

    # -- instruction and plan -------------------------------------------------------------------

    @classmethod
    def parse_instruction(cls, config: dict):
        """The instruction under ``cls.key``; KeyError/ValueError when it does not parse."""
        return cls.instruction_model.model_validate_json(str(config[cls.key]))

    @classmethod
    def for_instruction(cls, instruction) -> type[ReleaseKind]:
        """The kind that serves ``instruction`` (a training round's ``stage = "calibrate"`` is a
        calibration)."""
        return cls

    @classmethod
    def parse_plan(cls, text: str):
        """The plan the instruction carries; :class:`twinfed.errors.PlanError` when malformed."""
        raise NotImplementedError

    @classmethod
    def zeros(cls, plan, weights: list[np.ndarray]) -> list[np.ndarray]:
        """What a refusal sends in an unmasked round: zeros of the release's shape (``plan`` is
        None when it did not parse)."""
        raise NotImplementedError

    # -- admission --------------------------------------------------------------------------------

    def check_plan(self) -> None:
        """Checks on the plan alone, before the session's protections."""

    def admit(self, entries: list, audit) -> None:
        """Checks on the node's verified log, after the plan was found approved and before any
        patient is read."""

    def load(self) -> None:
        """Read the patients the release uses (consent checked now)."""
        raise NotImplementedError

    def recheck(self, entries: list) -> None:
        """Under the state lock, before the charge: the log's checks again (two releases at once
        never both pass)."""

    # -- the charge -------------------------------------------------------------------------------

    def segment(self, ledger, audit):
        """Under the lock, the plan DP: ``(Segment, delta)`` the session charges to ``ledger``."""
        raise NotImplementedError

    def charged(self, ledger, before: float, after: float) -> None:
        """The session charged the segment: the site's total went from ``before`` to ``after``."""

    # -- computation, record, reply ---------------------------------------------------------------

    def compute(self) -> list[np.ndarray]:
        """The update that leaves the node (noised if DP, clipped to the plan's range)."""
        raise NotImplementedError

    def record(self, audit, base: dict, update: list[np.ndarray], *, masked: bool) -> None:
        """The node's own audit entry of the release (exact figures: the log stays here)."""
        raise NotImplementedError

    def released(self) -> Released:
        """The reply's release figures (DP or declared: the wire allow-list)."""
        raise NotImplementedError

    def spec_columns(self) -> set[str]:
        spec = self.plan.spec
        return set(spec.state_columns + spec.control_columns + spec.covariate_columns)


def consented_site(node, spec, purpose: str):
    """The site's patients whose consent covers ``purpose`` (the registry, read now), and how
    many others the export holds."""
    from twinfed.governance.consent_registry import granted_patients
    from twinfed.models.site_data import load_site

    site = load_site(node.site_data, spec)
    in_export = site.n_patients
    used = site.subset(granted_patients(node.state_dir, purpose), reuse=True)
    return used, in_export - used.n_patients  # ``site``'s arrays now hold ``used``


def kind_for(config: dict) -> type[ReleaseKind]:
    """The kind of release ``config`` asks for, by its instruction's key (a round instruction may
    name another kind by its stage: see :meth:`ReleaseKind.for_instruction`)."""
    if TRIAL_KEY in config:
        from twinfed.client.kinds.trial import Trial

        return Trial
    from twinfed.client.kinds.training import TrainingRound

    return TrainingRound


__all__ = ["ReleaseKind", "consented_site", "kind_for"]
