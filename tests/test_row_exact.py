"""A hybrid twin's correction, run on every row of a roll-forward in one batch, gives each row the
same bits whatever else is in the batch (personalise.row_exact): the speed of one batch with the
exactness of a call per patient (personalise.by_group), which made a 400-patient trial 2.5x slower.

Searched (hypothesis) over batch compositions: which rows, how many, in what order, where a
patient's rows lie, on one torch thread and on two (a node computes on one; the CLI on torch's
default), and against MKL's batched product, which does round rows by where they lie.
"""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twinfed.models.hybrid import HybridSurrogate
from twinfed.models.personalise import RowExact, row_exact
from twinfed.models.plan import ModelConfig
from twinfed.models.spec import load_spec

SPEC = load_spec("glucose")
H = SPEC.history_steps
POOL = 700  # rows to draw batches from


def _model(hidden: int, layers: int) -> HybridSurrogate:
    """A hybrid twin's networks with weights moved away from their (zero) initialisation."""
    torch.manual_seed(hidden * 10 + layers)
    model = HybridSurrogate(SPEC, ModelConfig(kind="hybrid", hidden=hidden, layers=layers))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


MODELS = {(32, 1): _model(32, 1), (8, 2): _model(8, 2)}


def _rows(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"states": torch.rand(POOL, H, 1, generator=g) * 360 + 40,
            "controls": torch.rand(POOL, H, 2, generator=g) * torch.tensor([3.0, 60.0])
            * (torch.rand(POOL, H, 2, generator=g) < 0.3),
            "covariates": torch.rand(POOL, 2, generator=g) * 2 - 1}


POOL_ROWS = _rows()


def _take(idx) -> dict[str, torch.Tensor]:
    idx = torch.as_tensor(idx, dtype=torch.long)
    return {k: v[idx].contiguous() for k, v in POOL_ROWS.items()}


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.integers(1, 3 * 16 * 12), data=st.data(), model=st.sampled_from(sorted(MODELS)))
def test_a_rows_correction_is_the_same_bits_in_any_batch(threads, size, data, model):
    """Each row of a random batch (random rows, repeated or not, in random order) has the bits it
    has alone and in a batch of every pool row."""
    net = MODELS[model]
    every = row_exact(net.corrections, _take(np.arange(POOL)))
    idx = data.draw(st.lists(st.integers(0, POOL - 1), min_size=size, max_size=size), label="rows")
    batch = row_exact(net.corrections, _take(idx))
    assert torch.equal(batch, every[idx])
    one = data.draw(st.sampled_from(idx), label="alone")
    assert torch.equal(row_exact(net.corrections, _take([one]))[0], every[one])


def test_removing_one_patients_rows_leaves_every_other_row_bit_identical(threads):
    """400 patients of 16 rows each (a trial's 2 arms x 8 draws), less one, at each place."""
    net = MODELS[(32, 1)]
    idx = np.random.default_rng(3).integers(0, POOL, 400 * 16)
    full = row_exact(net.corrections, _take(idx))
    for gone in (0, 1, 199, 399):
        rest = np.delete(np.arange(idx.size), np.s_[gone * 16:(gone + 1) * 16])
        assert torch.equal(row_exact(net.corrections, _take(idx[rest])), full[rest])


def test_mkls_batched_product_does_round_rows_by_where_they_lie():
    """Why row_exact exists: the same correction through MKL gives a patient's rows other bits
    alone than inside 400 patients' batch (MKL takes another kernel for a few rows)."""
    net = MODELS[(32, 1)]
    idx = np.random.default_rng(4).integers(0, POOL, 400 * 16)
    with torch.no_grad():
        full = net.corrections(_take(idx))
        moved = [not torch.equal(net.corrections(_take(idx[s:s + n])), full[s:s + n])
                 for s, n in ((16, 1), (32, 5), (48, 16), (112, 33))]
    assert any(moved)


def test_row_exact_is_close_to_the_models_own_correction():
    net = MODELS[(32, 1)]
    u = _take(np.arange(POOL))
    with torch.no_grad():
        np.testing.assert_allclose(row_exact(net.corrections, u), net.corrections(u), rtol=0, atol=1e-4)


def test_an_operation_row_exact_cannot_vouch_for_is_refused():
    with pytest.raises(RuntimeError, match="matmul"):
        row_exact(lambda u: u["covariates"] @ u["covariates"].T, _take([0, 1]))
    with pytest.raises(RuntimeError, match="sum"):
        row_exact(lambda u: u["states"].sum(-2), _take([0, 1]))
    assert isinstance(RowExact(), torch.overrides.TorchFunctionMode)


def test_a_roll_forward_runs_the_correction_once_per_horizon_not_once_per_patient(monkeypatch):
    """The roll's correction is one call per horizon over every patient's rows: a call per patient
    per horizon (personalise.by_group) made a 400-patient, 7-day trial 2.5x slower."""
    from twinfed.models.plan import TrainingPlan
    from twinfed.models.rollout import Origins, roll_forward
    from twinfed.models.surrogate import build_surrogate, get_weights
    from twinfed.models.twin import Twin

    plan = TrainingPlan(spec=SPEC, rounds=1, model=ModelConfig(kind="hybrid", hidden=8, layers=1))
    twin = Twin.from_weights(plan, get_weights(build_surrogate(SPEC, plan.model, seed=0)))
    p, s, c = 5, len(SPEC.states), len(SPEC.controls)
    rng = np.random.default_rng(0)
    hist = np.concatenate([rng.uniform(80, 200, (p, H, s)), rng.uniform(0, 1, (p, H, c))], -1).astype(np.float32)
    lc = SPEC.context_steps or H
    ctx = np.concatenate([np.zeros((p, lc - H, s + c), np.float32), hist], 1)
    origins = Origins(hist, ctx, np.ones((p, lc), np.float32), np.zeros((p, len(SPEC.covariates)), np.float32),
                      np.arange(p, dtype=np.uint64))
    calls = []
    inner = type(twin.surrogate).corrections
    monkeypatch.setattr(type(twin.surrogate), "corrections", lambda self, u: calls.append(1) or inner(self, u))
    horizons = 3
    out = roll_forward(twin, origins, np.zeros((p, horizons * SPEC.horizon_steps, c), np.float32), draws=2)
    assert out.shape == (p, 2, horizons * SPEC.horizon_steps, s)
    assert len(calls) == horizons
