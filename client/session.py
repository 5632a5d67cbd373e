"""One round of work on a hospital node, in the order privacy requires.

1. parse and check the plan (the governance gate: later issues add approval and budget here),
2. load the site's data and keep only patients consented for the plan's purpose,
3. train locally from the global weights,
4. report only aggregate, plan-declared figures.

Nothing here logs patient identifiers or values.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass

import numpy as np

from twinfed.client.node import NodeConfig
from twinfed.errors import ConsentError, PlanError, TwinfedError
from twinfed.governance.consent import granted, site_consent
from twinfed.models.plan import TrainingPlan


class RoundRefused(TwinfedError):
    """The node declines a round; the reason is one line that may leave the node."""


@dataclass
class RoundOutcome:
    weights: list[np.ndarray]
    patients_used: int
    patients_excluded: int
    train_loss: float
    steps: int


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
    # Heavy imports stay here: a deployed ClientApp starts a fresh process per message.
    import torch

    from twinfed.models.site_data import load_site
    from twinfed.models.surrogate import build_surrogate, get_weights, set_weights
    from twinfed.models.train import train_local

    torch.set_num_threads(1)
    node.ensure_state_dir()
    site = load_site(node.site_data, plan.spec)
    consented = granted(site_consent(node.site_data), plan.purpose)
    used = site.subset(consented)
    excluded = site.n_patients - used.n_patients
    if used.n_patients == 0:
        raise ConsentError(f"site {node.site_name}: no patient has granted consent for purpose "
                           f"{plan.purpose!r}; import consent records before joining")
    model = build_surrogate(plan.spec, plan.model, seed=plan.seed)
    set_weights(model, weights)
    seed = round_seed(plan, node.site_name, server_round)
    torch.manual_seed(seed)
    result = train_local(model, used, plan.training, seed=seed)
    return RoundOutcome(get_weights(model), used.n_patients, excluded, result.mean_loss, result.steps)
