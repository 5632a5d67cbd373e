"""The node's fast DP step (per-patient Linear gradients, privacy/per_patient.py) computes the same
clipped, noised update as the path it replaced (Opacus's GradSampleModule ``hooks`` + DPOptimizer,
a forward and backward pass even over an empty Poisson draw), on every model kind, with real
Opacus on a fixed noise seed."""

import numpy as np
import pytest
import torch
from torch import nn

from twinfed.models.plan import ModelConfig
from twinfed.models.site_data import load_site
from twinfed.models.spec import load_spec
from twinfed.models.surrogate import build_surrogate, get_weights, inputs_for
from twinfed.models.train import PatientWindows, run_steps
from twinfed.privacy.dp import DPSettings, make_private, per_sample_method

KINDS = [("glucose", "hybrid"), ("cardio", "hybrid"), ("glucose", "mlp-residual")]
WINDOWS = 4
NOISE_SEED = 11


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    from twinfed.models.cohort import generate_cohort

    out = {}
    for twin in ("glucose", "cardio"):
        root = tmp_path_factory.mktemp(twin)
        generate_cohort(twin, sites=1, patients=12, days=1.5, seed=0, out=root)
        spec = load_spec(root / "spec.toml")
        out[twin] = (spec, load_site(root / "site-a", spec))
    return out


def _model(spec, kind):
    """The kind's default architecture, weights moved off the zero init so every layer learns."""
    net = build_surrogate(spec, ModelConfig(kind=kind))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return net


def _batch(sites, twin, kind, patients):
    spec, site = sites[twin]
    data = PatientWindows(site, seed=3, windows_per_patient=WINDOWS, inputs=inputs_for(spec, ModelConfig(kind=kind)))
    return spec, data.draw(np.arange(patients))


def _hooks_reference(net, dp, batches, *, empty_forward=True):
    """Today's path, as privacy/dp.py and models/train.py took it before the fast path: Opacus's
    GradSampleModule and DPOptimizer, forward and backward over every draw (empty ones too).
    ``empty_forward=False``: an empty draw hands DPOptimizer the empty per-sample gradients
    GradSampleModule makes of one, without the forward pass (the cardio core cannot run on an
    empty batch: today's path raised there)."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    module = GradSampleModule(net)
    module.forbid_grad_accumulation()
    opt = DPOptimizer(torch.optim.Adam(net.parameters(), lr=0.01), noise_multiplier=dp.noise_multiplier,
                      max_grad_norm=dp.clipping_norm, expected_batch_size=dp.expected_batch,
                      generator=torch.Generator().manual_seed(NOISE_SEED))
    try:
        for x, y in batches:
            opt.zero_grad(set_to_none=True)
            if len(x) or empty_forward:
                (((module(x) - y) ** 2).sum() / max(1, y.numel())).backward()
            else:
                for p in net.parameters():
                    p.grad_sample = torch.zeros((0, *p.shape))
            opt.step()
    finally:
        module.cleanup()
    return [p.grad.clone() for p in net.parameters()], get_weights(net)


def _product(net, dp, batches, method="auto"):
    """The node's path: make_private (its per-sample method chosen per model) and run_steps."""
    module, opt = make_private(net, torch.optim.Adam(net.parameters(), lr=0.01), dp, method=method)
    opt.generator = torch.Generator().manual_seed(NOISE_SEED)  # the CSPRNG seed, fixed for the test
    try:
        result = run_steps(module, opt, batches, len(batches))
    finally:
        module.cleanup()
    assert result.steps == len(batches)
    return [p.grad.clone() for p in net.parameters()], get_weights(net)


def _patient_norms(net, x, y):
    """Each patient's gradient norm (Opacus's hooks), to put the clipping bound among them."""
    from opacus import GradSampleModule

    module = GradSampleModule(net)
    (((module(x) - y) ** 2).sum() / y.numel()).backward()
    norms = torch.stack([p.grad_sample.reshape(len(x), -1).norm(dim=1) for p in net.parameters()], 1).norm(dim=1)
    module.cleanup()
    net.zero_grad(set_to_none=True)
    for p in net.parameters():
        p.grad_sample = None
    return norms


def _assert_same(got, expected):
    (g_got, w_got), (g_exp, w_exp) = got, expected
    for a, b in zip(g_got, g_exp):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    for a, b in zip(w_got, w_exp):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("twin,kind", KINDS)
def test_every_model_kind_takes_the_fast_path(sites, twin, kind):
    spec, _ = sites[twin]
    assert per_sample_method(build_surrogate(spec, ModelConfig(kind=kind))) == "linear"


@pytest.mark.parametrize("twin,kind", KINDS)
@pytest.mark.parametrize("patients", [6, 1], ids=["six-patients", "one-patient"])
def test_the_fast_step_gives_the_hooks_update_on_a_drawn_batch(sites, twin, kind, patients):
    spec, (x, y) = _batch(sites, twin, kind, patients)
    norms = _patient_norms(_model(spec, kind), x, y)
    # A bound some patients exceed and others do not (one patient: exceeded), so clipping matters.
    clip = float(norms.median()) if patients > 1 else float(norms[0]) / 2
    if patients > 1:
        assert (norms > clip).any() and (norms < clip).any()
    dp = DPSettings(noise_multiplier=0.7, clipping_norm=clip, sample_rate=0.5, expected_batch=4)
    expected = _hooks_reference(_model(spec, kind), dp, [(x, y)])
    got = _product(_model(spec, kind), dp, [(x, y)])
    _assert_same(got, expected)
    moved = [np.abs(a - b).max() for a, b in zip(got[1], get_weights(_model(spec, kind)))]
    assert min(moved) > 0  # every layer took the step


@pytest.mark.parametrize("twin,kind", KINDS)
def test_the_fast_step_gives_the_clipped_sum_exactly_without_noise(sites, twin, kind):
    """Noise off, so a clipping difference cannot hide under the noise."""
    spec, (x, y) = _batch(sites, twin, kind, 6)
    clip = float(_patient_norms(_model(spec, kind), x, y).median())
    dp = DPSettings(noise_multiplier=0.0, clipping_norm=clip, sample_rate=0.5, expected_batch=4)
    got = _product(_model(spec, kind), dp, [(x, y)])
    expected = _hooks_reference(_model(spec, kind), dp, [(x, y)])
    for a, b in zip(got[0], expected[0]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("twin,kind", KINDS)
def test_an_empty_draw_takes_the_same_noise_only_step_as_hooks(sites, twin, kind):
    spec, (x, y) = _batch(sites, twin, kind, 3)
    empty = (x[:0], y[:0])
    dp = DPSettings(noise_multiplier=1.1, clipping_norm=0.05, sample_rate=0.1, expected_batch=3)
    forward = twin != "cardio"
    expected = _hooks_reference(_model(spec, kind), dp, [empty], empty_forward=forward)
    got = _product(_model(spec, kind), dp, [empty])
    _assert_same(got, expected)
    assert all(np.abs(a - b).max() > 0 for a, b in zip(got[1], get_weights(_model(spec, kind))))
    # Then a normal draw: Adam's moments and the noise stream carry on alike.
    expected = _hooks_reference(_model(spec, kind), dp, [empty, (x, y), empty], empty_forward=forward)
    got = _product(_model(spec, kind), dp, [empty, (x, y), empty])
    _assert_same(got, expected)


def test_empty_draws_count_as_steps_for_the_accountant(sites):
    """Every draw the ledger reserved is a DP step Opacus's accountant sees, empty ones included."""
    from opacus.accountants import RDPAccountant

    spec, (x, y) = _batch(sites, "glucose", "hybrid", 3)
    net = _model(spec, "hybrid")
    dp = DPSettings(noise_multiplier=1.1, clipping_norm=0.05, sample_rate=0.1, expected_batch=3)
    module, opt = make_private(net, torch.optim.Adam(net.parameters(), lr=0.01), dp)
    accountant = RDPAccountant()
    opt.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=dp.sample_rate))
    draws = [(x[:0], y[:0]), (x, y), (x[:0], y[:0]), (x[:0], y[:0])]
    result = run_steps(module, opt, draws, 4)
    module.cleanup()
    assert result.steps == 4
    assert accountant.history == [(1.1, 0.1, 4)]
    assert torch.optim.Adam.state_dict(opt.original_optimizer)["state"][0]["step"] == 4


class _Scaled(nn.Module):
    """A Linear model with one trained parameter outside any Linear layer."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.lin = nn.Linear(n_in, n_out)
        self.gain = nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        return self.lin(x) * self.gain


def test_a_model_the_fast_path_cannot_handle_falls_back_to_hooks():
    from opacus import GradSampleModule

    net = _Scaled(3, 2)
    assert per_sample_method(net) == "hooks"
    module, opt = make_private(net, torch.optim.SGD(net.parameters(), lr=0.1), DPSettings(0.5, 1.0, 0.5, 2))
    assert isinstance(module, GradSampleModule)
    before = get_weights(net)
    result = run_steps(module, opt, [(torch.randn(2, 4, 3), torch.randn(2, 4, 2)), (torch.zeros(0, 4, 3),
                                                                                    torch.zeros(0, 4, 2))], 2)
    module.cleanup()
    assert result.steps == 2 and all(np.abs(a - b).max() > 0 for a, b in zip(get_weights(net), before))
    with pytest.raises(ValueError, match="gain is not a Linear"):
        make_private(_Scaled(3, 2), torch.optim.SGD(net.parameters(), lr=0.1), DPSettings(0.5, 1.0, 0.5, 2),
                     method="linear")


def test_cleanup_leaves_plain_linear_layers():
    net = nn.Sequential(nn.Linear(3, 4), nn.SiLU(), nn.Linear(4, 1))
    module, _ = make_private(net, torch.optim.SGD(net.parameters(), lr=0.1), DPSettings(0.5, 1.0, 0.5, 2))
    module.cleanup()
    x = torch.randn(5, 3)
    net(x).sum().backward()
    assert all(p.grad is not None for p in net.parameters())  # autograd's own weight gradients again
