"""The coordinator's strategy: the global model moves by the mean change of the sites that trained."""

from types import SimpleNamespace

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

from twinfed.models.plan import ModelConfig, PrivacyConfig, TrainingConfig, TrainingPlan
from twinfed.models.spec import load_spec
from twinfed.server.strategy import TwinStrategy


def _plan(rounds: int = 4) -> TrainingPlan:
    return TrainingPlan(spec=load_spec("glucose"), rounds=rounds, model=ModelConfig(hidden=4),
                        privacy=PrivacyConfig(secure_aggregation=False))


def _reply(update: float, status: str = "ok"):
    res = FitRes(status=Status(Code.OK, ""), parameters=ndarrays_to_parameters([np.full(3, update, np.float32)]),
                 num_examples=1, metrics={"site": f"s{update}", "status": status, "patients_used": 5,
                                          "patients_excluded": 0, "train_loss": 1.0, "reason": "no"})
    return SimpleNamespace(cid="x"), res


def test_the_global_model_moves_by_the_mean_change_of_the_sites_that_trained():
    s = TwinStrategy(_plan(), [np.zeros(3, np.float32)], min_nodes=3)
    s.aggregate_fit(1, [_reply(1.0), _reply(3.0), _reply(0.0, status="refused")], [])
    np.testing.assert_allclose(s.final_weights[0], 2.0)  # the refusing site is left out
    s.aggregate_fit(2, [_reply(1.0), _reply(0.0, status="refused"), _reply(0.0, status="refused")], [])
    np.testing.assert_allclose(s.final_weights[0], 3.0)
    assert [h["sites_trained"] for h in s.history] == [2, 1]


def test_the_cosine_schedule_falls_from_the_learning_rate_to_a_tenth_of_it():
    cfg = TrainingConfig(learning_rate=0.01, lr_schedule="cosine")
    lrs = [cfg.for_round(r, 10).learning_rate for r in range(1, 11)]
    assert lrs[0] == pytest.approx(0.01) and lrs[-1] == pytest.approx(0.001)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert TrainingConfig(lr_schedule="constant").for_round(7, 10).learning_rate == TrainingConfig().learning_rate
