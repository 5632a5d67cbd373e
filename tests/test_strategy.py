"""The coordinator's strategy: the global model moves by the mean change of the sites that trained,
and the coordinator records only what nodes released."""

from types import SimpleNamespace

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

from twinfed.models.plan import ModelConfig, PrivacyConfig, TrainingConfig, TrainingPlan
from twinfed.models.spec import load_spec
from twinfed.server.strategy import TwinStrategy
from twinfed.wire import DPCounts, NodeReply, Refusal, RefusalCode, Released


def _plan(rounds: int = 4) -> TrainingPlan:
    return TrainingPlan(spec=load_spec("glucose"), rounds=rounds, model=ModelConfig(hidden=4),
                        privacy=PrivacyConfig(secure_aggregation=False))


def _result(update: float, site: str, status: str = "ok", metrics: dict | None = None):
    reply = NodeReply(site=site, status=status,
                      refusal=None if status == "ok" else Refusal(code=RefusalCode.BUDGET_EXHAUSTED),
                      released=Released(steps=2, counts=DPCounts(patients_used=41, patients_excluded=3,
                                                                 noise_std=20.0))
                      if status == "ok" else None)
    res = FitRes(status=Status(Code.OK, ""), parameters=ndarrays_to_parameters([np.full(3, update, np.float32)]),
                 num_examples=1, metrics=reply.to_metrics() if metrics is None else metrics)
    return SimpleNamespace(cid=site), res


def test_the_global_model_moves_by_the_mean_change_of_the_sites_that_trained():
    s = TwinStrategy(_plan(), [np.zeros(3, np.float32)], min_nodes=3)
    s.aggregate_fit(1, [_result(1.0, "a"), _result(3.0, "b"), _result(0.0, "c", status="refused")], [])
    np.testing.assert_allclose(s.final_weights[0], 2.0)  # the refusing site is left out
    s.aggregate_fit(2, [_result(1.0, "a"), _result(0.0, "b", "refused"), _result(0.0, "c", "refused")], [])
    np.testing.assert_allclose(s.final_weights[0], 3.0)
    assert [h["sites_trained"] for h in s.history] == [2, 1]
    assert s.history[0]["update_norm"] == pytest.approx(np.sqrt(3 * 2.0**2))


def test_the_coordinator_keeps_released_figures_and_refusal_codes_only():
    lines = []
    s = TwinStrategy(_plan(), [np.zeros(3, np.float32)], min_nodes=3, progress=lines.append)
    s.aggregate_fit(1, [_result(1.0, "a"), _result(0.0, "c", status="refused")], [])
    a, c = s.sites["a"].summary(), s.sites["c"].summary()
    assert (a["patients_used"], a["patients_excluded"]) == (41, 3)
    assert a["release"] == {"patients_used": "dp-released", "patients_excluded": "dp-released",
                            "privacy": "withheld"}
    assert c["refusals"] == [{"round": 1, "code": "budget_exhausted"}]
    assert c["patients_used"] is None and c["release"]["patients_used"] == "withheld"
    text = " ".join(lines) + str(s.history) + str(a) + str(c)
    assert "loss" not in text and "reason" not in text
    assert "1 site(s) trained, 1 refused" in lines[0] and "update norm" in lines[0]


def test_a_reply_that_is_not_the_typed_contract_counts_as_refused_and_is_never_trusted():
    s = TwinStrategy(_plan(), [np.zeros(3, np.float32)], min_nodes=3)
    junk = {"site": "x", "status": "ok", "train_loss": 0.5, "patients_used": 12}
    s.aggregate_fit(1, [_result(1.0, "a"), _result(5.0, "x", metrics=junk)], [])
    np.testing.assert_allclose(s.final_weights[0], 1.0)
    assert s.history[0]["sites_trained"] == 1 and s.history[0]["sites_refused"] == 1


def test_a_skipped_round_changes_nothing_and_is_told_to_the_next_instruction():
    s = TwinStrategy(_plan(), [np.zeros(3, np.float32)], min_nodes=3)
    s.record_skipped(1, [_result(1.0, "a"), _result(0.0, "b", "refused")], [], code="too_few_trained",
                     trained=1)
    np.testing.assert_allclose(s.final_weights[0], 0.0)
    assert s.history[0]["skipped"] and s.skipped_rounds == [1]
    from twinfed.wire import RoundInstruction

    instruction = RoundInstruction.from_config(s._fit_config(2))
    assert instruction.skipped_rounds == (1,) and instruction.round == 2


def test_the_cosine_schedule_falls_from_the_learning_rate_to_a_tenth_of_it():
    cfg = TrainingConfig(learning_rate=0.01, lr_schedule="cosine")
    lrs = [cfg.for_round(r, 10).learning_rate for r in range(1, 11)]
    assert lrs[0] == pytest.approx(0.01) and lrs[-1] == pytest.approx(0.001)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert TrainingConfig(lr_schedule="constant").for_round(7, 10).learning_rate == TrainingConfig().learning_rate


def test_the_secagg_setup_follows_the_nodes_sampled_not_the_studys_minimum():
    from twinfed.server.secagg_workflow import TwinSecAggPlusWorkflow

    plan = TrainingPlan(spec=load_spec("glucose"), rounds=2, model=ModelConfig(hidden=4))
    workflow = TwinSecAggPlusWorkflow(plan)
    # The runbook's min-nodes = 3, and 10 hospitals online: the neighbourhood and threshold the
    # plan's assumptions give for 10 sampled nodes (1 corrupt, 1 dropped: a ring of 5, t = 3).
    assert workflow.sampled(10) == (10, 5, 3)
    assert (workflow.num_shares, workflow.reconstruction_threshold) == (5, 3)
    assert workflow.sampled(1000)[1:] == (45, 26)
    strategy = TwinStrategy(plan, [np.zeros(3, np.float32)], min_nodes=3, masked=True,
                            on_sampled=workflow.sampled)

    class Manager:  # ten nodes online; FedAvg samples them all
        def num_available(self):
            return 10

        def sample(self, num_clients, min_num_clients):
            return [SimpleNamespace(cid=str(i)) for i in range(num_clients)]

    from flwr.common import ndarrays_to_parameters as to_params

    assert len(strategy.configure_fit(1, to_params([np.zeros(3, np.float32)]), Manager())) == 10
    assert strategy._secagg == (10, 5, 3)
