"""TEMPORARY shim for tests being moved to :mod:`twinfed.client.gate` and
:mod:`twinfed.client.kinds`; removed in this change."""

from twinfed.client.gate import serve as serve_release  # noqa: F401


def _reserve(node, plan, server_round, audit, entries):
    from twinfed.client.kinds.trial import Trial
    from twinfed.privacy.ledger import PrivacyLedger
    from twinfed.wire import TrialInstruction

    release = Trial(node, plan, TrialInstruction(plan_json=plan.canonical_json(), plan_sha256=plan.sha256()), [])
    p = plan.privacy
    ledger = PrivacyLedger.open(node.state_dir, audit, entries, epsilon_budget=p.epsilon, delta_budget=p.delta,
                                accountant=p.accountant)
    ledger.require_delta(p.delta)
    segment, delta = release.segment(ledger, audit)
    before = ledger.spent()
    release.charged(ledger, before, ledger.reserve(segment, delta, audit))
    return release.z, release.aggregate


def _compute(plan, site, patients, weights):
    import secrets

    from twinfed.client.kinds.calibration import calibration_sum
    from twinfed.client.kinds.trial import trial_sum

    fn = trial_sum if getattr(plan, "kind", None) == "in-silico-trial" else calibration_sum
    return fn(plan, site, patients, weights, seed=secrets.randbits(128))
