"""Personalisation at the hospital: each patient's core parameters, identified from their record.

A maximum-a-posteriori fit in the spirit of ReplayBG (Cappon et al. 2023): the hybrid twin's
encoder gives the prior (the population's guess for this patient, window by window), and the
patient's own windows give the likelihood (the forecast error over the horizon). What is fitted
is one **offset per patient** on the core's unconstrained parameters ``z``, added to the
encoder's output for each of the patient's windows: the encoder keeps adapting to the moment
(e.g. today's level), the offset carries what is stable about this patient (their insulin
sensitivity, their carbohydrate ratio), and every parameter stays in its physiological range by
construction. The prior is a Gaussian on the offset around zero; the encoder and the correction
stay as trained.

This is care for that patient at the hospital that holds the record: nothing of it is released,
so it needs no differential privacy. It uses only windows that *end* before ``until`` (the
decision time of a what-if, or the end of the identification period when evaluating), never the
future it is judged on. Patients are fitted together, vectorised (independent objectives).

**Per patient.** A patient's identification depends on their own record and the seed only, never
on the other patients fitted with them: the windows are drawn by a generator keyed to the seed and
the patient (:func:`patient_rng`), and the objective is a sum of per-patient objectives, each the
mean over that patient's own windows plus their prior, so Adam's elementwise steps on one
patient's offset see only that patient. A released aggregate (a trial, a calibration) depends on
this: removing one patient must leave every other patient's contribution unchanged (DESIGN.md
section 4; tests/test_per_patient_release.py).

**What the fit does not know** (issue 21 item 1). Around the fitted offset, a Laplace
(Gauss-Newton) posterior per patient (:func:`laplace_posterior`): with ``J`` the Jacobian of the
patient's window outputs (scaled units, ``M`` per window) with respect to the offset (``n``
parameters) and ``sigma^2`` the patient's residual variance at the fit (the noise model, floored
at ``SIGMA2_FLOOR``),

    precision = (J^T J + c I) / sigma^2,   c = prior_weight * M / n,

the summed likelihood of all the patient's outputs plus the fit's Gaussian prior in the same
summed units (``prior_weight * mean(offset^2)`` is weighed against one window's mean squared
error, i.e. the prior is worth one window). The likelihood grows with the windows, the prior does
not, so the posterior sharpens as the record grows. That precision treats every output as an
independent reading, which a record is not: a window's twelve errors move together (sensor
drift, a meal the core gets wrong) and overlapping windows share readings. Measured on records
of the core's own physiology with a CGM's correlated noise, its 95% interval of insulin
sensitivity held the truth for 69% / 28% of 32 patients at 16 / 128 windows (44% of 16 at 48).
So the covariance is the **cluster-robust sandwich** around it, ``H^-1 (sum_c s_c s_c^T) H^-1 *
C/(C-1)``, with ``H`` the precision above and ``s_c`` the score (``J^T r / sigma^2``) summed over
a cluster of windows that start within one window's span of each other (``C`` clusters), centred
(at the fit the scores sum to the prior's pull, not to zero); on the same records it held the
truth for 94% / 88% / 81% at 16 / 48 / 128 windows. What remains at 128 is bias the spread cannot
show: the fit's error stops shrinking (median 19% at 48 and at 128 windows) where the other
parameters and the prior trade off with insulin sensitivity. With no more than twice as many
clusters as parameters the middle is not stable: the precision's inverse is then inflated by the
windows' design effect,
``M mean_w(rbar_w^2) / mean(r^2)`` (1 for independent errors, ``M`` for errors shared by a
window's ``M`` outputs). It is each patient's own too: ``J`` and the
residuals are computed row by row and summed over that patient's rows alone.
:func:`parameter_spread` maps it through the core's binding to one physical parameter (the
delta method on its log: a relative spread), with an identifiability flag.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from twinfed.models.site_data import SiteData
from twinfed.models.windows import WindowIndex, gather

WINDOWS = 48  # windows per patient the fit looks at, spread over the identification span
STEPS = 50
LEARNING_RATE = 0.12
# The prior's weight against the mean squared forecast error (both in scaled units): a patient
# with little record stays near the encoder's guess.
PRIOR_WEIGHT = 0.02

# What a per-patient generator is for (:func:`patient_rng`): one stream per purpose, so the same
# seed draws a patient's identification windows and their roll-forward errors independently.
IDENTIFICATION = 1
ROLLOUT = 2
POSTERIOR = 3  # a trial's draws of a patient's core parameters from their posterior
# The noise model's floor on a patient's residual variance (scaled units squared; DELTA_UNITS = 10
# per half-range, so 1e-3 is a residual SD of 0.03, 0.09 mg/dL for glucose): noise-free data
# would otherwise claim a point mass.
SIGMA2_FLOOR = 1e-3
# The Laplace posterior's Jacobian by central differences (:func:`window_jacobian`): the step on
# the unconstrained parameters, and how many model rows one pass may hold (memory: a window's
# context is ~1k floats per row; 8192 rows ~ 40 MB).
JACOBIAN_STEP = 1e-2
JACOBIAN_ROWS = 8192
# A parameter is identified from a patient's record when its posterior relative SD (the SD of its
# log) is below this: a 95% interval within a factor of exp(1.96 * 0.25) = 1.63 either way.
IDENTIFIABLE_REL_SD = 0.25
# The parameter whose spread flags a patient as identified, by core: the one a treatment's effect
# scales with (the glucose core's insulin sensitivity, the cardio core's maximal drug effect).
KEY_PARAMETERS = ("si", "emax")


def key_parameter(binding) -> str:
    """The core parameter whose posterior spread is a patient's identifiability flag."""
    names = [p.name for p in binding.params]
    return next((k for k in KEY_PARAMETERS if k in names), names[0])
SEED_BITS = 128  # a seed is an int in [0, 2**128): a design's public seed or a release's secret


def patient_key(patient_id: str) -> int:
    """A stable 64-bit key of a patient id (SHA-256; the same on every machine and run, unlike
    Python's ``hash``). Never leaves the node."""
    return int.from_bytes(hashlib.sha256(patient_id.encode()).digest()[:8], "big")


def check_seed(seed) -> int:
    """``seed`` as an int in [0, 2**128); ValueError otherwise."""
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) \
            or not 0 <= int(seed) < 2 ** SEED_BITS:
        raise ValueError(f"a seed is an integer in [0, 2**{SEED_BITS}), not {seed!r}")
    return int(seed)


def patient_rng(seed, purpose: int, key: int) -> np.random.Generator:
    """The generator of one patient's draws for one ``purpose`` under ``seed``: a function of the
    three alone, so of neither the other patients nor their order. ``key``: the patient's
    :func:`patient_key`. The entropy is fixed-width words (the seed's 4, the purpose's 1, the
    key's 2), so distinct triples never share a generator."""
    seed = check_seed(seed)
    words = [(seed >> (32 * i)) & 0xFFFFFFFF for i in range(SEED_BITS // 32)]
    words += [int(purpose) & 0xFFFFFFFF, (int(key) >> 32) & 0xFFFFFFFF, int(key) & 0xFFFFFFFF]
    return np.random.default_rng(words)


def by_group(fn, u: dict[str, torch.Tensor], groups: list[np.ndarray]) -> torch.Tensor:
    """``fn`` (a row-wise map of a dict of tensors, e.g. a twin's encoder) computed on each group
    of rows alone (``groups``: row indices, e.g. one patient's), gathered into fresh tensors,
    and laid back in the rows' order. A matrix product (MKL) rounds a row by where it lies in
    memory: in one batch a patient's rows would round differently when another patient is
    removed; alone, each patient's rows lie where they always do."""
    outs = [fn({k: v[torch.from_numpy(g)] for k, v in u.items()}) for g in groups]
    n = sum(g.size for g in groups)
    out = outs[0].new_empty((n, *outs[0].shape[1:]))
    for g, o in zip(groups, outs):
        out[torch.from_numpy(g)] = o
    return out


# Operations whose every output element is its inputs' correctly rounded (IEEE) result or an exact
# copy, on the vectorised and the scalar path alike: where a row lies cannot change them.
_ROUNDED_ALIKE = frozenset({
    "__getitem__", "unsqueeze", "squeeze", "flatten", "reshape", "view", "contiguous", "clone", "cat",
    "add", "__add__", "__radd__", "sub", "__sub__", "__rsub__", "mul", "__mul__", "__rmul__", "div",
    "__truediv__", "__rtruediv__", "neg", "__neg__", "abs", "clamp", "clamp_min", "clamp_max", "minimum",
    "maximum", "where", "sqrt", "float", "to", "__get__", "dim", "size", "numel", "shape",
})
# Elementwise maps that ATen computes one way in its vectorised body (SLEEF) and another in the
# scalar loop of a tensor's last few elements (libm): log1p and silu differ in 44% and 4% of
# random floats. Computed so that every element takes the vectorised body (:func:`_vector_body`).
_TRANSCENDENTAL = frozenset({"log1p", "tanh", "silu", "sigmoid", "exp", "log", "expm1"})
# A multiple of every float vector loop's step (ATen steps by two vectors: 16 floats with AVX2,
# 32 with AVX-512).
_VECTOR_STEP = 64


def _vector_body(func, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """``func(x)`` elementwise with every element in ATen's vectorised loop: ``x`` flattened and
    padded with zeros to a multiple of the loop's step times every way ``at::parallel_for`` can
    split it across the threads (each thread's share is then a whole number of steps, so no
    element falls in a scalar tail)."""
    flat = x.reshape(-1)
    unit = _VECTOR_STEP * math.lcm(*range(1, torch.get_num_threads() + 1))
    padded = flat.new_zeros(-(-max(flat.numel(), 1) // unit) * unit)
    padded[:flat.numel()] = flat
    return func(padded, *args, **kwargs)[:flat.numel()].reshape(x.shape)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` summed in a fixed order, one input feature after the other, with
    one correctly rounded multiply and one add per term (separate kernels: nothing fuses them
    into an FMA): each output element depends on its own row and the weights alone."""
    lead, k = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, k)
    wt = weight.t().contiguous()
    acc = torch.mul(rows[:, 0:1], wt[0])
    term = torch.empty_like(acc)
    for i in range(1, k):
        torch.mul(rows[:, i:i + 1], wt[i], out=term)
        acc.add_(term)
    if bias is not None:
        acc.add_(bias)
    return acc.reshape(*lead, weight.shape[0])


class RowExact(TorchFunctionMode):
    """Inside it, a row-wise map (e.g. a twin's correction) gives each row the same bits whatever
    else is in its batch, by construction: a linear layer is summed in a fixed order
    (:func:`_linear`, not MKL, whose rounding of a row depends on where it lies), a
    transcendental map takes ATen's vectorised path for every element (:func:`_vector_body`),
    and every other operation must be one whose elements are correctly rounded alike on every
    path (``_ROUNDED_ALIKE``); any other operation (a reduction, a matrix product) is refused
    with a RuntimeError rather than silently rounded by position. The speed of one batch, the
    exactness of :func:`by_group`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if func is F.linear:
            return _linear(*args, **kwargs)
        if name in _TRANSCENDENTAL:
            if kwargs.get("inplace"):
                raise RuntimeError(f"RowExact: in-place {name} is not supported")
            kwargs = {k: v for k, v in kwargs.items() if k != "inplace"}
            return _vector_body(func, *args, **kwargs)
        if name not in _ROUNDED_ALIKE:
            raise RuntimeError(f"RowExact: {name or func} is not known to round a row alike in every batch")
        return func(*args, **kwargs)


def row_exact(fn, u: dict[str, torch.Tensor]) -> torch.Tensor:
    """``fn(u)`` (a row-wise map of a dict of tensors, e.g. a hybrid twin's ``corrections``) on
    every row at once, each row's result bit-identical to what it is in any other batch
    (:class:`RowExact`); a RuntimeError if ``fn`` uses an operation RowExact cannot vouch for."""
    with torch.no_grad(), RowExact():
        return fn(u)


def runs(owner: np.ndarray) -> list[np.ndarray]:
    """The row indices of each run of equal, consecutive ``owner`` values (rows grouped by
    patient), in order."""
    cuts = np.flatnonzero(np.diff(owner)) + 1
    return [r for r in np.split(np.arange(owner.size), cuts) if r.size]


@dataclass
class Identified:
    """Per patient: the fitted ``offset`` (``[P, n_params]``, added to the encoder's ``z``) and
    how many windows each fit used (0: no full window before ``until``; the offset is then 0).

    The windows themselves: ``starts`` (row indices into the site, grouped by patient) and
    ``owner`` (each window's row of ``offset``, i.e. its position in ``patients``, the site
    indices fitted), so what is computed on the fit's own windows (a patient's error scale for
    prediction intervals, ``twinfed.models.calibration``) needs no second selection."""

    offset: torch.Tensor
    n_windows: np.ndarray
    starts: np.ndarray
    owner: np.ndarray
    patients: np.ndarray
    # The Laplace posterior's covariance of each offset ``[P, n, n]`` (float64; NaN for a patient
    # without windows, who has no noise model): :func:`laplace_posterior`.
    posterior_cov: torch.Tensor | None = None


def identification_windows(site: SiteData, patients: np.ndarray, until_steps: np.ndarray, *,
                           windows: int = WINDOWS, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The windows an identification reads: for each of ``patients``, up to ``windows`` of its
    windows whose horizon ends at or before its ``until_steps``, drawn without replacement by
    the patient's own generator (:func:`patient_rng`: the same windows whoever else is fitted).
    Returns the window starts (grouped by patient, in the order of ``patients``) and the count
    per patient."""
    check_seed(seed)
    index = WindowIndex.build(site)
    h, k = site.spec.history_steps, site.spec.horizon_steps
    starts, counts = [], []
    for p, until in zip(patients, until_steps):
        own = index.starts[index.ptr[p]: index.ptr[p + 1]]
        own = own[site.steps[own + h + k - 1] <= until]
        if own.size > windows:
            rng = patient_rng(seed, IDENTIFICATION, patient_key(site.patient_ids[p]))
            own = np.sort(rng.choice(own, windows, replace=False))
        counts.append(own.size)
        starts.append(own)
    flat = np.concatenate(starts).astype(np.int64) if starts else np.zeros(0, np.int64)
    return flat, np.array(counts, dtype=np.int64)


def identify(model, site: SiteData, patients: np.ndarray, until_steps: np.ndarray, *,
             windows: int = WINDOWS, steps: int = STEPS, prior_weight: float = PRIOR_WEIGHT,
             seed: int = 0, posterior: bool = False) -> Identified:
    """Fit each of ``patients`` (indices into ``site``) on its windows whose horizon ends at or
    before its ``until_steps`` (the site's time grid). Each patient's fit is their own: the same
    whoever else is fitted with them, in whatever order (see the module's note). With
    ``posterior``, also each patient's Laplace posterior around the fit
    (``Identified.posterior_cov``)."""
    patients = np.asarray(patients, dtype=np.int64)
    starts, counts = identification_windows(site, patients, until_steps, windows=windows, seed=seed)
    owner_np = np.repeat(np.arange(len(patients)), counts)
    offset = torch.zeros(len(patients), len(model.binding.params), requires_grad=True)
    if counts.sum() == 0:
        n = offset.shape[1]
        cov = torch.full((len(patients), n, n), float("nan"), dtype=torch.float64) if posterior else None
        return Identified(offset.detach(), counts, starts, owner_np, patients, cov)
    owner = torch.from_numpy(owner_np)
    model.eval()
    with torch.no_grad():  # what does not depend on the offset, once
        batch = gather(site, starts, patients[owner_np], with_context=True)
        u = model.unpack(torch.from_numpy(model.inputs.batch_features(batch)))
        y = torch.from_numpy(model.inputs.targets(batch))
        # each patient's rows alone: see by_group
        z_windows = by_group(model.parameters_of, u, runs(owner_np))
        correction = by_group(model.corrections, u, runs(owner_np))
    # Each patient's objective is the mean over their own windows (never over all patients'
    # windows: a patient's step would then shrink as the site grows) plus their prior, and the
    # loss is the sum of these; no row of the batch reads another (no batch statistics).
    weight = torch.from_numpy(1.0 / np.maximum(counts, 1)).float()[owner]
    # Adam, written out: torch.optim's constructor imports the compiler stack (~1.5 s), which a
    # what-if from the shell cannot afford. Its steps are elementwise with a fixed learning rate
    # and no clipping, so one patient's offset moves by their own gradients alone.
    m, v = torch.zeros_like(offset), torch.zeros_like(offset)
    b1, b2 = 0.9, 0.999
    for t in range(1, steps + 1):
        # each structure of an ensemble fitted on its own (HybridSurrogate.member_outputs)
        err = ((model.member_outputs(u, z_windows + offset[owner], correction) - y.unsqueeze(-2)) ** 2
               ).mean(-1).mean(-1)
        prior = prior_weight * (offset ** 2).mean(-1).sum()
        (grad,) = torch.autograd.grad((err * weight).sum() + prior, offset)
        with torch.no_grad():
            m.mul_(b1).add_(grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            offset -= LEARNING_RATE * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + 1e-8)
    offset = offset.detach()
    # windows that start within one window's span of each other share record: one cluster
    clusters = site.steps[starts] // site.spec.window_steps
    cov = laplace_posterior(model, u, z_windows, correction, y, offset, owner_np, counts,
                            prior_weight=prior_weight, clusters=clusters) if posterior else None
    return Identified(offset, counts, starts, owner_np, patients, cov)


def laplace_posterior(model, u: dict[str, torch.Tensor], z_windows: torch.Tensor, correction: torch.Tensor,
                      y: torch.Tensor, offset: torch.Tensor, owner: np.ndarray, counts: np.ndarray, *,
                      prior_weight: float = PRIOR_WEIGHT, clusters=None) -> torch.Tensor:
    """Each patient's Laplace (Gauss-Newton) posterior covariance ``[P, n, n]`` (float64) of their
    ``offset`` at the fitted point (see the module's note for the formula): ``model.outputs(u,
    z_windows + offset[owner], correction)`` are the windows' forecasts (rows grouped by patient,
    ``owner`` each row's patient, ``counts`` their windows), ``y`` their targets; ``clusters``
    each row's cluster for the sandwich (rows sharing record; None: each row its own). The
    Jacobian is :func:`window_jacobian`'s; a patient without windows gets NaN."""
    n_pat, n = offset.shape
    cov = torch.full((n_pat, n, n), float("nan"), dtype=torch.float64)
    if owner.size == 0:
        return cov
    idx = torch.from_numpy(owner)
    at = z_windows + offset[idx]
    with torch.no_grad():
        out = model.member_outputs(u, at, correction)  # [W, S, M]: each structure's outputs
        jac = window_jacobian(model, u, at, correction)  # [W, S, M, n]
    resid = out - y.unsqueeze(-2)
    structures, m = resid.shape[-2:]
    prior = prior_weight * structures * m / n
    for rows in runs(owner):  # each patient's rows alone, in fresh tensors: see by_group
        p = int(owner[rows[0]])
        r = torch.from_numpy(rows)
        # each structure's noise model (an ensemble's structures fit the patient unequally well)
        sigma2 = [max(float((resid[r][:, j].double() ** 2).mean()), SIGMA2_FLOOR) for j in range(structures)]
        precision = prior / (sum(sigma2) / structures) * torch.eye(n, dtype=torch.float64)
        scores = torch.zeros(rows.size, n, dtype=torch.float64)  # each window's score
        for j in range(structures):
            jw = jac[r][:, j].double()  # [w, M, n]
            precision = precision + jw.reshape(-1, n).T @ jw.reshape(-1, n) / sigma2[j]
            scores = scores + torch.einsum("wmn,wm->wn", jw, resid[r][:, j].double()) / sigma2[j]
        inv = torch.linalg.inv(precision)
        ids = np.unique(clusters[rows], return_inverse=True)[1] if clusters is not None else np.arange(rows.size)
        c = int(ids.max()) + 1
        if c > 2 * n:  # enough clusters for a stable sandwich (its middle of full rank, and some)
            summed = torch.zeros(c, n, dtype=torch.float64).index_add_(0, torch.from_numpy(ids), scores)
            # centred: at the fit the scores sum to the prior's pull (and to what the fit's last
            # steps left), not to zero
            summed = summed - summed.mean(0)
            cov[p] = inv @ (summed.T @ summed * (c / (c - 1))) @ inv
        else:  # the precision's inverse, inflated by how much a window's errors move together
            rp = resid[r].double()
            deff = m * float((rp.mean(-1) ** 2).mean()) / max(float((rp ** 2).mean()), 1e-12)
            cov[p] = inv * min(max(deff, 1.0), float(m))
    return cov


def window_jacobian(model, u: dict[str, torch.Tensor], z: torch.Tensor, correction: torch.Tensor, *,
                    step: float = JACOBIAN_STEP, rows_per_pass: int = JACOBIAN_ROWS) -> torch.Tensor:
    """Each window's Jacobian ``[W, S, M, n]`` of ``model.member_outputs(u, z, correction)`` with
    respect to its own ``z`` ``[W, n]``, by central differences: the ``2n`` shifted copies of a
    block of windows go through the model as one batch (a row reads its own ``z`` alone, so a
    shift of one row's ``z`` moves that row's outputs alone). Forward-mode AD (``jacfwd``) gave
    the same to about 1e-4 but took 12 of a 40-patient trial's 28 s: its tangents run the core's
    many small steps one dual operation at a time. ``step`` on the unconstrained ``z`` (O(1)):
    truncation error ~ step^2, float32 rounding ~ 1e-7 / step, both ~1e-4 of the outputs' scale."""
    w, n = z.shape
    shifts = torch.cat([torch.eye(n), -torch.eye(n)]) * step  # [2n, n]
    block = max(1, rows_per_pass // (2 * n))
    parts = []
    for lo in range(0, w, block):
        sl = slice(lo, min(w, lo + block))
        b = sl.stop - sl.start
        zz = (z[sl].unsqueeze(0) + shifts.unsqueeze(1)).reshape(2 * n * b, n)
        uu = {k: v[sl].repeat(2 * n, *([1] * (v.dim() - 1))) for k, v in u.items()}
        cc = correction[sl].repeat(2 * n, *([1] * (correction.dim() - 1)))
        out = model.member_outputs(uu, zz, cc)
        out = out.reshape(2, n, b, *out.shape[1:])
        parts.append(((out[0] - out[1]) / (2 * step)).movedim(0, -1))
    return torch.cat(parts) if parts else torch.zeros(0, 1, 1, n)


@dataclass
class Spread:
    """One core parameter's posterior spread per patient (:func:`parameter_spread`): its value at
    the fit, its SD (the parameter's units), its relative SD (the SD of its log) and whether the
    record identifies it (relative SD below ``IDENTIFIABLE_REL_SD``). NaN and not identifiable
    for a patient without a posterior."""

    name: str
    value: np.ndarray
    sd: np.ndarray
    relative_sd: np.ndarray
    identifiable: np.ndarray


def parameter_spread(model, site: SiteData, fitted: Identified, name: str, *,
                     reference: tuple[dict[str, torch.Tensor], torch.Tensor] | None = None) -> Spread:
    """The posterior spread of core parameter ``name`` (e.g. the glucose core's insulin
    sensitivity ``si``) for each patient of ``fitted``, by the delta method through the binding:
    with ``g`` the gradient of ``log theta[name]`` with respect to ``z`` at ``z_ref + offset``,
    relative SD = sqrt(g^T Sigma g) and SD = theta * relative SD. ``reference``: each patient's
    unpacked inputs and encoder ``z`` at which to read the parameter (e.g. a what-if's origin);
    by default each patient's last identification window."""
    n_pat = len(fitted.patients)
    names = [p.name for p in model.binding.params]
    if name not in names:
        raise ValueError(f"the core has no parameter {name!r} (it has {', '.join(names)})")
    nan = np.full(n_pat, np.nan)
    if fitted.posterior_cov is None or n_pat == 0:
        return Spread(name, nan, nan.copy(), nan.copy(), np.zeros(n_pat, bool))
    if reference is None:
        has = fitted.n_windows > 0
        last = np.cumsum(fitted.n_windows) - 1
        rows = fitted.starts[last[has]]
        if not has.any():
            return Spread(name, nan, nan.copy(), nan.copy(), np.zeros(n_pat, bool))
        with torch.no_grad():
            batch = gather(site, rows, fitted.patients[has], with_context=True)
            u = model.unpack(torch.from_numpy(model.inputs.batch_features(batch)))
            z_ref = by_group(model.parameters_of, u, [np.array([i]) for i in range(int(has.sum()))])
        offset = fitted.offset[torch.from_numpy(np.flatnonzero(has))]
        cov = fitted.posterior_cov[torch.from_numpy(np.flatnonzero(has))]
    else:
        has = np.ones(n_pat, bool)
        u, z_ref = reference
        offset, cov = fitted.offset, fitted.posterior_cov
    z = (z_ref + offset).detach().requires_grad_(True)
    log_theta = torch.log(model.binding.theta(z, u)[name])
    (g,) = torch.autograd.grad(log_theta.sum(), z)  # row-wise: each row's own gradient
    g = g.double()
    rel = torch.sqrt(torch.einsum("pi,pij,pj->p", g, cov, g)).numpy()
    value = torch.exp(log_theta).detach().double().numpy()
    out_value, out_sd, out_rel = nan.copy(), nan.copy(), nan.copy()
    out_value[has], out_rel[has], out_sd[has] = value, rel, value * rel
    identifiable = np.where(np.isfinite(out_rel), out_rel < IDENTIFIABLE_REL_SD, False)
    return Spread(name, out_value, out_sd, out_rel, identifiable.astype(bool))


def posterior_draws(offset: torch.Tensor, cov: torch.Tensor, keys, draws: int, *, seed) -> torch.Tensor:
    """``draws`` samples ``[P, draws, n]`` of each patient's offset from their Laplace posterior
    N(``offset``, ``cov``) (``cov`` ``[P, n, n]``, e.g. ``Identified.posterior_cov``), each
    patient's from their own generator (:func:`patient_rng` with ``POSTERIOR``; ``keys``: their
    :func:`patient_key`), so the same whoever else is drawn. A patient without a posterior (NaN)
    keeps their offset in every draw."""
    seed = check_seed(seed)
    p, n = offset.shape
    out = np.empty((p, max(1, int(draws)), n))
    for i in range(p):
        mean = offset[i].double().numpy()
        c = cov[i].numpy()
        if not np.isfinite(c).all():
            out[i] = mean
            continue
        try:
            chol = np.linalg.cholesky(c)
        except np.linalg.LinAlgError:  # numerically semi-definite: a little jitter
            chol = np.linalg.cholesky(c + np.eye(n) * 1e-9 * max(float(np.trace(c)), 1e-12))
        eps = patient_rng(seed, POSTERIOR, int(keys[i])).standard_normal((out.shape[1], n))
        out[i] = mean + eps @ chol.T
    return torch.from_numpy(out.astype(np.float32))
