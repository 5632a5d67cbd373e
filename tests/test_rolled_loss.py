"""The rolled-forward loss (TrainingConfig.rolled_hours, issue 21 item 2): opt-in, a hybrid twin's
core is also rolled over hours from each origin under the recorded controls and scored against the
record every 30 minutes, so the encoder learns parameters that hold beyond the 60-minute horizon.
Off, plans hash and train as before; on, each patient's DP example carries its own long windows,
and a per-sample gradient is still one patient's under both per-sample methods."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from builders import write_site
from twinfed.models.plan import ModelConfig, TrainingConfig, TrainingPlan
from twinfed.models.site_data import load_site
from twinfed.models.spec import CORE_STRUCTURES, load_spec, parse_spec
from twinfed.models.surrogate import build_surrogate, get_weights, inputs_for
from twinfed.models.train import ROLLED_WINDOWS, PatientWindows, rolled_loss, run_steps, train_local
from twinfed.models.windows import gather
from twinfed.privacy.dp import DPSettings, make_private

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GLUCOSE = load_spec("glucose")
HYBRID = ModelConfig(kind="hybrid")
NOISE_SEED = 11


def _with_structures(spec, structures):
    line = f'name = "{spec.core.name}"\n'
    listed = "structures = [" + ", ".join(f'"{s}"' for s in structures) + "]\n"
    return parse_spec(spec.to_toml().replace(line, line + listed, 1))


def _short_context(spec, steps: int = 96):
    """``spec`` identifying patients from 8 hours instead of 24: the same model, quicker steps."""
    return parse_spec(spec.to_toml().replace(f"context_steps = {spec.context_steps}", f"context_steps = {steps}"))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from twinfed.models.cohort import generate_cohort

    root = tmp_path_factory.mktemp("glucose")
    generate_cohort("glucose", sites=1, patients=8, days=2, seed=0, out=root)
    return root


@pytest.fixture()
def mixed_root(tmp_path):
    """Four patients of 100 steps (8 h 20 min), the first cut to 50: too short for a 4-hour long
    window (2 h of history + 4 h), long enough for the 3-hour short ones."""
    root = write_site(tmp_path / "site", n_patients=4, n_steps=100)
    lines = (root / "timeseries.csv").read_text().splitlines()
    kept = [lines[0]] + [line for line in lines[1:] if not line.startswith("p0,")]
    kept += [line for line in lines[1:] if line.startswith("p0,")][:50]
    (root / "timeseries.csv").write_text("\n".join(kept) + "\n")
    return root


@pytest.fixture()
def mixed_site(mixed_root):
    return load_site(mixed_root, GLUCOSE)


# -- the plan ------------------------------------------------------------------------------------

def _training_section_sha(training: TrainingConfig) -> str:
    doc = json.loads(TrainingPlan(spec=GLUCOSE, rounds=3, training=training).canonical_json())["training"]
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def test_it_is_off_by_default_and_plans_written_before_keep_their_canonical_json_and_hash():
    assert TrainingConfig().rolled_hours == 0
    # Pinned before the fields existed: the training section of a default plan and of another.
    assert _training_section_sha(TrainingConfig()) == \
        "1b81366b2cff345231273a821158f9f83dab281d57dd7f2327fd188c8dd144db"
    assert _training_section_sha(TrainingConfig(local_steps=2, batch_size=4, windows_per_patient=3,
                                                learning_rate=0.05, lr_schedule="constant")) == \
        "bc022a1b37d79f44e08c89aee881913ae449ee012931442d3bed29d7221c9346"
    plan = TrainingPlan(spec=GLUCOSE, rounds=3)
    assert "rolled" not in plan.canonical_json()
    on = TrainingPlan(spec=GLUCOSE, rounds=3, training=TrainingConfig(rolled_hours=6.0, rolled_weight=1.0))
    assert on.sha256() != plan.sha256()
    assert TrainingPlan.model_validate_json(on.canonical_json()) == on
    assert json.loads(on.canonical_json())["training"]["rolled_hours"] == 6.0


def test_off_a_patients_example_is_its_short_windows_alone(mixed_site):
    data = PatientWindows(mixed_site, seed=0, windows_per_patient=3, inputs=inputs_for(GLUCOSE, HYBRID))
    assert len(data.draw(np.arange(len(data)))) == 2


@pytest.mark.parametrize("field, value, message", [
    ("rolled_hours", 1.0, "rolled_hours must be 0 (off) or 2 to 12 hours in steps of 30 minutes, got 1"),
    ("rolled_hours", 12.5, "got 12.5"),
    ("rolled_hours", 6.2, "got 6.2"),
    ("rolled_hours", -1.0, "greater than or equal to 0"),
    ("rolled_weight", 0.0, "greater than 0"),
    ("rolled_weight", 101.0, "less than or equal to 100"),
])
def test_a_bad_rolled_setting_is_a_one_line_error(field, value, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as err:
        TrainingConfig(**{field: value})
    msg = err.value.errors()[0]["msg"]
    assert message in msg and "\n" not in msg


def test_the_rolled_loss_needs_a_hybrid_twin_on_a_grid_its_step_divides():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="rolled_hours needs a hybrid twin"):
        TrainingPlan(spec=GLUCOSE, rounds=1, model=ModelConfig(kind="mlp-residual"),
                     training=TrainingConfig(rolled_hours=6.0))
    seven = parse_spec(GLUCOSE.to_toml().replace("step_minutes = 5", "step_minutes = 7"))
    with pytest.raises(ValidationError, match="step of 7 minutes does not divide it"):
        TrainingPlan(spec=seven, rounds=1, training=TrainingConfig(rolled_hours=6.0))


def test_a_plan_file_with_a_bad_rolled_setting_is_refused_in_one_line(tmp_path):
    from twinfed.errors import PlanError
    from twinfed.governance.approvals import load_plan_file

    doc = json.loads(TrainingPlan(spec=GLUCOSE, rounds=1).canonical_json())
    doc["training"]["rolled_hours"] = 1.5
    (tmp_path / "plan.json").write_text(json.dumps(doc))
    with pytest.raises(PlanError) as err:
        load_plan_file(tmp_path / "plan.json")
    assert "rolled_hours must be 0 (off) or 2 to 12 hours" in str(err.value) and "\n" not in str(err.value)


# -- the data ------------------------------------------------------------------------------------

def test_on_a_patients_example_carries_long_windows_of_its_own_record(mixed_site):
    inputs = inputs_for(GLUCOSE, HYBRID)
    data = PatientWindows(mixed_site, seed=0, windows_per_patient=3, inputs=inputs,
                          rolled_hours=4.0, rolled_weight=0.8)
    assert len(data) == 4  # the short patient's example still counts
    x, y, xl, yl, wl = data.draw(np.arange(4))
    steps, every, h = 48, 6, GLUCOSE.history_steps
    assert x.shape[:2] == (4, 3) and xl.shape[:2] == (4, ROLLED_WINDOWS)
    assert yl.shape == (4, ROLLED_WINDOWS, steps // every, 1)
    long_inputs = inputs.spanning(steps)
    assert xl.shape[-1] == long_inputs.n_features
    patients = data.patients
    # The short patient (p0, 50 rows) has no 72-row stretch: weight 0, finite stand-ins.
    short = int(np.flatnonzero(np.diff(mixed_site.offsets) == 50)[0])
    row = int(np.flatnonzero(patients == short)[0])
    assert torch.all(wl[row] == 0) and torch.isfinite(xl[row]).all() and torch.isfinite(yl[row]).all()
    for b in range(4):
        if b == row:
            continue
        assert torch.allclose(wl[b], torch.full((ROLLED_WINDOWS,), 0.8 / ROLLED_WINDOWS))
        p = int(patients[b])
        first, end = int(mixed_site.offsets[p]), int(mixed_site.offsets[p + 1])
        candidates = np.arange(first, end - (h + steps) + 1)
        windows = gather(mixed_site, candidates, np.full(len(candidates), p), with_context=True, horizon=steps)
        feats = torch.from_numpy(long_inputs.batch_features(windows))
        targets = torch.from_numpy(long_inputs.rolled_targets(windows, every))
        for r in range(ROLLED_WINDOWS):
            match = torch.nonzero((feats == xl[b, r]).all(-1)).flatten()
            assert len(match) >= 1, "each long window is one of the patient's own"
            assert torch.equal(targets[match[0]], yl[b, r])
    # The targets are the recorded glucose every 30 minutes, as changes from the origin's reading.
    win = gather(mixed_site, np.array([int(mixed_site.offsets[1])]), np.array([1]), horizon=steps)
    half = (GLUCOSE.states[0].max - GLUCOSE.states[0].min) / 2
    expected = (win.future_states[0, every - 1::every, 0] - win.history[0, -1, 0]) / half * 10
    np.testing.assert_allclose(long_inputs.rolled_targets(win, every)[0, :, 0], expected, rtol=1e-5)


def test_the_loss_adds_each_patients_rolled_error_with_its_weight(mixed_site):
    inputs = inputs_for(GLUCOSE, HYBRID)
    net = build_surrogate(GLUCOSE, HYBRID, seed=1)
    data = PatientWindows(mixed_site, seed=2, windows_per_patient=3, inputs=inputs, rolled_hours=4.0,
                          rolled_weight=0.8)
    x, y, xl, yl, wl = data.draw(np.arange(4))
    with torch.no_grad():
        short = float(((net(x) - y) ** 2).mean())
        paths = net.rolled_outputs(xl, yl.shape[-2])[:, :, 0]  # one structure
        per_window = ((paths - yl) ** 2).mean((-2, -1))
        expected = short + float((wl * per_window).sum() / 4)
        assert float(rolled_loss(net, xl, yl, wl)) == pytest.approx(expected - short, rel=1e-5)
    assert float(per_window[wl > 0].mean()) > 0.01  # the long term is not negligible
    got = run_steps(net, torch.optim.SGD(net.parameters(), lr=0.0), [(x, y, xl, yl, wl)], 1)
    assert got.mean_loss == pytest.approx(expected, rel=1e-5)
    # A stand-in window weighs nothing: its targets do not move the loss.
    row = int(np.flatnonzero((wl == 0).all(1))[0])
    moved = yl.clone()
    moved[row] += 5.0
    with torch.no_grad():
            assert float(rolled_loss(net, xl, moved, wl)) == pytest.approx(expected - short, rel=1e-6)


def test_an_ensemble_fits_each_structures_long_path_on_its_own(mixed_root):
    ensemble = _with_structures(GLUCOSE, CORE_STRUCTURES["glucose-insulin"])
    site = load_site(mixed_root, ensemble)
    inputs = inputs_for(ensemble, HYBRID)
    net = build_surrogate(ensemble, HYBRID, seed=1)
    _, _, xl, yl, wl = PatientWindows(site, seed=2, windows_per_patient=2, inputs=inputs, rolled_hours=4.0) \
        .draw(np.arange(4))
    with torch.no_grad():
        paths = net.rolled_outputs(xl, yl.shape[-2])
        assert paths.shape == (4, ROLLED_WINDOWS, 2, 8, 1)
        assert (paths[:, :, 0] - paths[:, :, 1]).abs().max() > 1e-3  # two structures, two paths
        each = [((paths[:, :, m] - yl) ** 2).mean((-2, -1)) for m in range(2)]
        expected = float((wl * (each[0] + each[1]) / 2).sum() / 4)  # each fitted, not their mean
        assert float(rolled_loss(net, xl, yl, wl)) == pytest.approx(expected, rel=1e-5)
        mean_path = ((paths.mean(2) - yl) ** 2).mean((-2, -1))
        assert float((wl * mean_path).sum() / 4) != pytest.approx(expected, rel=1e-3)


def test_an_empty_draw_keeps_the_long_windows_shapes(mixed_site):
    data = PatientWindows(mixed_site, seed=0, windows_per_patient=3, inputs=inputs_for(GLUCOSE, HYBRID),
                          rolled_hours=4.0)
    full, empty = data.draw(np.arange(2)), data.draw(np.array([], dtype=np.int64))
    assert [tuple(t.shape[1:]) for t in empty] == [tuple(t.shape[1:]) for t in full]
    assert all(len(t) == 0 for t in empty)


def test_private_training_with_the_rolled_loss_takes_every_draw_empty_ones_included(cohort):
    from twinfed.privacy.dp import patient_examples, train_private

    spec = _short_context(GLUCOSE)
    site = load_site(cohort / "site-a", spec)
    config = TrainingConfig(local_steps=4, batch_size=2, windows_per_patient=2, rolled_hours=3.0)
    for rate in (0.02, 0.5):  # nearly every draw empty; most draws a few patients
        net = build_surrogate(spec, HYBRID, seed=0)
        before = get_weights(net)
        result = train_private(net, patient_examples(site, config, inputs_for(spec, HYBRID)), config,
                               DPSettings(1.0, 0.1, rate, 2), steps=4)
        assert result.steps == 4
        assert any(np.abs(a - b).max() > 0 for a, b in zip(get_weights(net), before))


# -- DP: a per-sample gradient is still one patient's --------------------------------------------

def _model(spec):
    net = build_surrogate(spec, HYBRID)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return net


def _draw(cohort, spec, patients=6):
    site = load_site(cohort / "site-a", spec)
    data = PatientWindows(site, seed=3, windows_per_patient=3, inputs=inputs_for(spec, HYBRID), rolled_hours=3.0)
    return data.draw(np.arange(patients))


def _per_patient_grads(net, batch):
    """Each patient's gradient of the batch loss (Opacus's hooks), flattened: ``[B, weights]``."""
    from opacus import GradSampleModule

    x, y, xl, yl, wl = batch
    module = GradSampleModule(net)
    out = module(x)
    y = y.unsqueeze(-2) if out.dim() > y.dim() else y  # an ensemble's structures, each fitted
    (((out - y) ** 2).sum() / out.numel() + rolled_loss(module, xl, yl, wl)).backward()
    grads = torch.cat([p.grad_sample.reshape(len(x), -1) for p in net.parameters()], 1)
    module.cleanup()
    net.zero_grad(set_to_none=True)
    for p in net.parameters():
        p.grad_sample = None
    return grads


def _step(net, dp, batch, method):
    module, opt = make_private(net, torch.optim.Adam(net.parameters(), lr=0.01), dp, method=method)
    opt.generator = torch.Generator().manual_seed(NOISE_SEED)
    try:
        run_steps(module, opt, [batch], 1)
    finally:
        module.cleanup()
    return [p.grad.clone() for p in net.parameters()], get_weights(net)


@pytest.mark.parametrize("structures", [None, CORE_STRUCTURES["glucose-insulin"]], ids=["one-core", "ensemble"])
@pytest.mark.parametrize("noise", [0.0, 0.7])
def test_both_per_sample_methods_give_the_same_update_with_the_rolled_loss(cohort, structures, noise):
    spec = _short_context(GLUCOSE if structures is None else _with_structures(GLUCOSE, structures))
    batch = _draw(cohort, spec)
    assert (batch[4] > 0).any()
    norms = _per_patient_grads(_model(spec), batch).norm(dim=1)
    clip = float(norms.median())
    assert (norms > clip).any() and (norms < clip).any()  # clipping matters
    dp = DPSettings(noise_multiplier=noise, clipping_norm=clip, sample_rate=0.5, expected_batch=4)
    (g_lin, w_lin), (g_hook, w_hook) = (_step(_model(spec), dp, batch, m) for m in ("linear", "hooks"))
    for a, b in zip(g_lin, g_hook):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)
    for a, b in zip(w_lin, w_hook):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # The rolled term moved the update: without it the same step differs.
    short = tuple(batch[:2])
    net = _model(spec)
    module, opt = make_private(net, torch.optim.Adam(net.parameters(), lr=0.01), dp, method="linear")
    opt.generator = torch.Generator().manual_seed(NOISE_SEED)
    run_steps(module, opt, [short], 1)
    module.cleanup()
    assert max(float((a - p.grad).abs().max()) for a, p in zip(g_lin, net.parameters())) > 1e-6


def test_a_patients_gradient_with_the_rolled_loss_is_theirs_whoever_else_is_drawn(cohort):
    spec = _short_context(GLUCOSE)
    batch = _draw(cohort, spec, patients=5)
    alone = _per_patient_grads(_model(spec), tuple(t[:1] for t in batch))[0]
    together = _per_patient_grads(_model(spec), batch)
    torch.testing.assert_close(together[0], alone, rtol=1e-4, atol=1e-7)
    others = tuple(torch.cat([t[:1], t[3:]]) for t in batch)
    torch.testing.assert_close(_per_patient_grads(_model(spec), others)[0], alone, rtol=1e-4, atol=1e-7)


# -- the effect ----------------------------------------------------------------------------------

@pytest.mark.studies  # two trainings: kept out of the 10-minute suite
def test_training_with_the_rolled_loss_holds_the_core_over_hours(cohort):
    """The same quick local training with the rolled loss off and on: the core's error 2 to 4 h
    after the origin, on long windows the training drew or not, is measurably lower on."""
    spec = _short_context(GLUCOSE)
    site = load_site(cohort / "site-a", spec)
    inputs = inputs_for(spec, HYBRID)
    probe = PatientWindows(site, seed=99, windows_per_patient=1, inputs=inputs, rolled_hours=4.0)
    _, _, xl, yl, wl = probe.draw(np.repeat(np.arange(len(probe)), 8))

    def late_error(net) -> float:
        net.eval()
        with torch.no_grad():
            paths = net.rolled_outputs(xl, yl.shape[-2])[:, :, 0]
        return float(((paths - yl) ** 2)[wl > 0][:, 3:].mean())  # +2 h to +4 h

    errors = {}
    for hours in (0.0, 4.0):
        net = build_surrogate(spec, HYBRID, seed=0)
        train_local(net, site, TrainingConfig(local_steps=40, batch_size=8, windows_per_patient=2,
                                              learning_rate=0.03, lr_schedule="constant",
                                              rolled_hours=hours, rolled_weight=4.0), seed=0, inputs=inputs)
        errors[hours] = late_error(net)
    assert errors[4.0] < 0.85 * errors[0.0], errors
