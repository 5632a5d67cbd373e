"""A trained twin's forecast accuracy on a site's patients (``twinfed evaluate``).

Protocol, the same for every kind of twin so that figures compare: each patient's first
``identify_hours`` of record are the identification period (what personalisation may read), and
every window whose forecast origin comes after it is scored, against persistence and any extra
forecasters on exactly those windows. A hybrid twin is scored personalised (each patient's core
parameters fitted on their identification period only, see ``twinfed.models.personalise``) and,
beside it, as the population twin (the encoder's parameters): ``population_rmse_by_step``.
``identify_hours = 0`` scores every window with the population twin.
"""

from __future__ import annotations

import time

import numpy as np

IDENTIFY_HOURS = 48.0  # (imported by the CLI for its help: this module's top stays light)


def evaluate(model_dir, spec_arg, data_dir, *, stride: int = 1, personalise: bool = True,
             identify_hours: float = IDENTIFY_HOURS, extra_forecasters: dict | None = None) -> dict:
    """``twinfed evaluate``: load the twin, the spec and the site, then :func:`evaluate_twin`."""
    from twinfed.models.site_data import load_site
    from twinfed.models.spec import load_spec
    from twinfed.models.twin import Twin

    twin = Twin.load(model_dir)
    spec = load_spec(spec_arg)
    twin.check_spec(spec)
    return evaluate_twin(twin, load_site(data_dir, spec), stride=stride, personalise=personalise,
                         identify_hours=identify_hours, extra_forecasters=extra_forecasters)


def evaluate_twin(twin, site, *, stride: int = 1, personalise: bool = True,
                  identify_hours: float = IDENTIFY_HOURS, extra_forecasters: dict | None = None) -> dict:
    from twinfed.models.metrics import evaluate_site

    spec = site.spec
    first = site.steps[site.offsets[:-1]]
    identify_steps = int(round(identify_hours * 60 / spec.step_minutes))
    origin_from = first + identify_steps if identify_steps > 0 else None
    forecasters = {"model": twin.forecast} | (extra_forecasters or {})
    info: dict = {"identify_hours": identify_hours, "personalised": False}
    if twin.hybrid and personalise and identify_steps > 0:
        from twinfed.models.personalise import identify

        t0 = time.perf_counter()
        fitted = identify(twin.surrogate, site, np.arange(site.n_patients), first + identify_steps - 1)
        seconds = time.perf_counter() - t0
        info = {"identify_hours": identify_hours, "personalised": True,
                "patients_fitted": int((fitted.n_windows > 0).sum()),
                "seconds_per_patient": seconds / max(1, site.n_patients)}
        forecasters = {"model": lambda b: twin.forecast(b, offset=fitted.offset[b.patients]),
                       "population": twin.forecast} | (extra_forecasters or {})
    report = evaluate_site(site, forecasters, stride=max(1, stride),
                           with_context=twin.inputs.with_context, origin_from=origin_from)
    return report | {"personalisation": info, "model": _model_label(twin),
                     "privacy": twin.plan.privacy.label()}


def _model_label(twin) -> dict:
    from twinfed.models.hybrid import n_trained_weights

    return {"kind": twin.plan.model.kind, "trained_weights": n_trained_weights(twin.surrogate),
            "pretrained_sha256": twin.plan.model.pretrained_sha256}
