"""One round of training on a hospital node, once the governance gate let it through.

1. load the site's data and keep only patients whose consent (the node's registry) covers the
   plan's purpose,
2. check the round's privacy spend against the node's ledger, train with DP-SGD from the global
   weights, record the spend,
3. return the clipped weight change and only aggregate, plan-declared figures.

Nothing here logs patient identifiers or values.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass

import numpy as np

from twinfed.client.node import NodeConfig
from twinfed.errors import ConsentError, PlanError, TwinfedError
from twinfed.models.plan import TrainingPlan


class RoundRefused(TwinfedError):
    """The node declines a round; the reason is one line that may leave the node."""


@dataclass
class RoundOutcome:
    update: list[np.ndarray]  # change of the weights over the round, clipped to the plan's range
    patients_used: int
    patients_excluded: int
    train_loss: float
    steps: int
    update_clip_fraction: float  # share of update entries that hit the clip (should be ~0)
    privacy: dict | None  # None only for a --no-dp baseline


def parse_plan(text: str) -> TrainingPlan:
    try:
        return TrainingPlan.model_validate_json(text)
    except ValueError as exc:
        raise PlanError(f"the coordinator sent a malformed plan ({str(exc).splitlines()[0]})") from None


def round_seed(plan: TrainingPlan, site_name: str, server_round: int) -> int:
    site = zlib.crc32(site_name.encode())
    return int.from_bytes(hashlib.sha256(f"{plan.seed}:{site}:{server_round}".encode()).digest()[:4], "big")


def train_round(node: NodeConfig, plan: TrainingPlan, weights: list[np.ndarray],
                server_round: int) -> RoundOutcome:
    """Train one admitted round (see ``twinfed.client.gate``, which must have let it through)."""
    # Heavy imports stay here: a deployed ClientApp starts a fresh process per message.
    import torch

    from twinfed.governance.consent_registry import granted_patients
    from twinfed.models.site_data import load_site
    from twinfed.models.surrogate import build_surrogate, get_weights, set_weights

    torch.set_num_threads(1)
    node.ensure_state_dir()
    site = load_site(node.site_data, plan.spec)
    used = site.subset(granted_patients(node.state_dir, plan.purpose))
    excluded = site.n_patients - used.n_patients
    if used.n_patients == 0:
        raise ConsentError(f"site {node.site_name}: no patient has granted consent for purpose "
                           f"{plan.purpose!r} in the node's registry; import consent records with "
                           "'twinfed consent import' before joining")
    model = build_surrogate(plan.spec, plan.model, seed=plan.seed)
    set_weights(model, weights)
    if plan.privacy.enabled:
        result, privacy = _train_private(node, plan, model, used, server_round)
    else:
        from twinfed.models.train import train_local

        seed = round_seed(plan, node.site_name, server_round)
        torch.manual_seed(seed)
        result, privacy = train_local(model, used, plan.training.for_round(server_round, plan.rounds),
                                      seed=seed, optimizer_state=optimizer_state(node, plan)), None
    clip = plan.privacy.update_clip
    update = [new - old for new, old in zip(get_weights(model), weights)]
    entries = sum(u.size for u in update)
    clipped = sum(int((np.abs(u) > clip).sum()) for u in update)
    update = [np.clip(u, -clip, clip).astype(np.float32) for u in update]
    return RoundOutcome(update, used.n_patients, excluded, result.mean_loss, result.steps,
                        clipped / max(1, entries), privacy)


def optimizer_state(node: NodeConfig, plan: TrainingPlan):
    """Where the node keeps its optimiser's moments for this study (never sent)."""
    return node.state_dir / "studies" / f"{plan.sha256()}.optimizer.pt"


def _train_private(node: NodeConfig, plan: TrainingPlan, model, used, server_round: int):
    from twinfed.privacy.calibrate import sample_rate
    from twinfed.privacy.dp import DPSettings, patient_examples, train_private
    from twinfed.privacy.ledger import Segment, epsilon_of
    from twinfed.privacy.study import open_ledger, study_privacy

    data = patient_examples(used, plan.training)
    if len(data) == 0:
        raise RoundRefused(f"site {node.site_name}: no consented patient has a full window of "
                           f"{plan.spec.window_steps} steps; nothing to train on")
    ledger = open_ledger(node.state_dir, plan, len(data))
    study = study_privacy(node.state_dir, plan, ledger, len(data))
    # The rate follows the patients eligible today (a withdrawal raises it); the ledger decides.
    q = sample_rate(len(data), plan.training.batch_size)
    segment = Segment(sample_rate=q, noise_multiplier=study.noise_multiplier,
                      steps=plan.training.local_steps, plan_sha256=plan.sha256(), round=server_round)
    ledger.check(segment)
    result = train_private(model, data, plan.training.for_round(server_round, plan.rounds),
                           DPSettings(study.noise_multiplier, plan.privacy.clipping_norm, q),
                           steps=plan.training.local_steps,
                           optimizer_state=optimizer_state(node, plan))
    # Recorded before the update leaves the node: a crash after this over-counts, never under.
    ledger.record(segment)
    mine = [s for s in ledger.segments if s.plan_sha256 == plan.sha256()]
    privacy = {
        "epsilon": epsilon_of(mine, ledger.delta, ledger.state.accountant),
        "delta": ledger.delta,
        "accountant": ledger.state.accountant,
        "noise_multiplier": study.noise_multiplier,
        "clipping_norm": plan.privacy.clipping_norm,
        "segments": [{"sample_rate": s.sample_rate, "noise_multiplier": s.noise_multiplier,
                      "steps": s.steps} for s in mine],
        "site_epsilon_spent": ledger.spent(),
        "site_epsilon_budget": ledger.budget,
    }
    return result, privacy
