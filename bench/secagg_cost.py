"""SecAgg+ cost at 10, 100 and 1,000 sites: one node's work and the coordinator's, per round.

Flower's own SecAgg+ functions, called as its client mod and its server workflow call them, for
the neighbourhood (k, t) that twinfed chooses at each number of sampled sites (the default
plan's assumptions), on the default plan's twin (its real weight shapes). Not a simulated
round: 1,000 simulated SuperNodes on Ray do not fit 2 cores (``rounds_per_site`` runs real
simulated rounds of up to 100 sites).

- Per site: two key pairs; Shamir shares of the mask seed and of ``sk1`` for k holders; k-1
  key agreements and encryptions of the shares; k-1 decryptions, key agreements and pairwise
  masks (the PRG over the whole update), the private mask, quantisation. CPU seconds.
- Coordinator, per round: summing n masked updates, rebuilding every node's secret from t
  shares, removing the n private masks, and for the assumed ``ceil(dropout_fraction * n)``
  dropped nodes their k-1 pairwise masks; CPU seconds and peak traced memory (tracemalloc:
  Python and numpy allocations). Without SecAgg+: the plain sum of n float updates.
Targets: per site, 1,000 sites within 3x of 10; coordinator, cost / (n log2 n) not growing.
"""

from __future__ import annotations

import math
import os
import time
import tracemalloc

import numpy as np

from bench.report import figure

TARGET_PER_SITE = 3.0
MOD, TARGET = 2**32, 2**22


def _update_shapes(plan) -> list[tuple[int, ...]]:
    from twinfed.models.surrogate import build_surrogate, get_weights

    return [w.shape for w in get_weights(build_surrogate(plan.spec, plan.model, seed=0))]


def _keys(k: int):
    from flwr.supercore.primitives.asymmetric import (generate_key_pairs, private_key_to_bytes,
                                                      public_key_to_bytes)
    pairs = [generate_key_pairs() for _ in range(k)]
    return [(private_key_to_bytes(sk), public_key_to_bytes(pk)) for sk, pk in pairs]


def node_seconds(k: int, t: int, shapes, neighbours) -> float:
    """One node's SecAgg+ CPU for a neighbourhood of k (itself included), threshold t;
    ``neighbours``: k-1 other nodes' (pk1, pk2) public keys."""
    from flwr.common.secure_aggregation.crypto.shamir import create_shares
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import (decrypt, encrypt,
                                                                             generate_shared_key)
    from flwr.common.secure_aggregation.ndarrays_arithmetic import (parameters_addition,
                                                                    parameters_mod)
    from flwr.common.secure_aggregation.quantization import quantize
    from flwr.common.secure_aggregation.secaggplus_utils import (pseudo_rand_gen,
                                                                share_keys_plaintext_concat,
                                                                share_keys_plaintext_separate)
    from flwr.supercore.primitives.asymmetric import (bytes_to_private_key, bytes_to_public_key,
                                                      generate_key_pairs, private_key_to_bytes,
                                                      public_key_to_bytes)

    update = [np.random.default_rng(0).normal(0, 0.01, s).astype(np.float32) for s in shapes]
    c0 = time.process_time()
    (sk1, pk1), (sk2, pk2) = generate_key_pairs(), generate_key_pairs()
    sk1b, sk2b = private_key_to_bytes(sk1), private_key_to_bytes(sk2)
    public_key_to_bytes(pk1), public_key_to_bytes(pk2)
    seed = os.urandom(32)
    b_shares, sk_shares = create_shares(seed, t, k), create_shares(sk1b, t, k)
    ciphertexts = []
    for i, (_, their_pk2) in enumerate(neighbours):  # stage 1: share keys
        key = generate_shared_key(bytes_to_private_key(sk2b), bytes_to_public_key(their_pk2))
        ciphertexts.append((key, encrypt(key, share_keys_plaintext_concat(1, i + 2, b_shares[i + 1],
                                                                        sk_shares[i + 1]))))
    for key, ct in ciphertexts:  # stage 2: the shares this node receives (as many, as large)
        share_keys_plaintext_separate(decrypt(key, ct))
    dims = [a.shape for a in update]
    masked = quantize(update, 0.5, TARGET)
    masked = parameters_addition(masked, pseudo_rand_gen(seed, MOD, dims))
    for their_pk1, _ in neighbours:
        key = generate_shared_key(bytes_to_private_key(sk1b), bytes_to_public_key(their_pk1))
        masked = parameters_addition(masked, pseudo_rand_gen(key, MOD, dims))
    parameters_mod(masked, MOD)
    return time.process_time() - c0


def coordinator_round(n: int, k: int, t: int, dropped: int, shapes, keys) -> tuple[float, int]:
    """The coordinator's unmasking of one round: CPU seconds; peak traced bytes is the second
    value when tracemalloc is on."""
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
    from flwr.common.secure_aggregation.ndarrays_arithmetic import (parameters_addition,
                                                                    parameters_mod,
                                                                    parameters_subtraction)
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
    from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

    rng = np.random.default_rng(1)
    dims = list(shapes)
    # What arrives: n - dropped masked vectors, and t shares per node (prepared outside the timing).
    vectors = [[rng.integers(0, MOD, s, dtype=np.int64) for s in dims] for _ in range(n - dropped)]
    seed_shares = [create_shares(os.urandom(32), t, k)[:t] for _ in range(n - dropped)]
    sk_shares = [create_shares(keys[i % len(keys)][0], t, k)[:t] for i in range(dropped)]
    if tracemalloc.is_tracing():
        tracemalloc.reset_peak()
    c0 = time.process_time()
    total = vectors[0]
    for v in vectors[1:]:
        total = parameters_addition(total, v)
    for shares in seed_shares:  # each surviving node's private mask
        total = parameters_subtraction(total, pseudo_rand_gen(combine_shares(shares), MOD, dims))
    for i, shares in enumerate(sk_shares):  # each dropped node's pairwise masks with its ring
        sk = bytes_to_private_key(combine_shares(shares))
        for j in range(1, k):
            pk1 = keys[(i + j) % len(keys)][1]
            key = generate_shared_key(sk, bytes_to_public_key(pk1))
            total = parameters_addition(total, pseudo_rand_gen(key, MOD, dims))
    parameters_mod(total, MOD)
    seconds = time.process_time() - c0
    peak = tracemalloc.get_traced_memory()[1] if tracemalloc.is_tracing() else 0
    return seconds, peak


def plain_round_seconds(n: int, shapes) -> float:
    rng = np.random.default_rng(2)
    updates = [[rng.normal(0, 0.01, s).astype(np.float32) for s in shapes] for _ in range(n)]
    c0 = time.process_time()
    total = [np.zeros(s, np.float64) for s in shapes]
    for u in updates:
        for a, b in zip(total, u):
            a += b
    [a / n for a in total]
    return time.process_time() - c0


def run(plan, sites: tuple[int, ...], repeats: int = 3) -> dict:
    from twinfed.privacy.neighbourhood import Assumptions, neighbourhood

    shapes = _update_shapes(plan)
    a = Assumptions.of(plan)
    out: dict = {}
    per_site: dict[int, float] = {}
    coord: dict[int, float] = {}
    for n in sites:
        chosen = neighbourhood(n, a)
        k, t, d = chosen.shares, chosen.threshold, a.dropped(n)
        keys = _keys(max(k, 2))
        neighbours = [(pk, pk) for _, pk in keys[1:k]]
        node = min(node_seconds(k, t, shapes, neighbours) for _ in range(repeats))
        # At a thousand sites one unmasking is minutes of Flower's pure-Python Shamir: once.
        rounds = 1 if n >= 500 else max(1, repeats - 1)
        seconds = min(coordinator_round(n, k, t, d, shapes, keys)[0] for _ in range(rounds))
        tracemalloc.start()
        try:
            peak = coordinator_round(n, k, t, d, shapes, keys)[1]
        finally:
            tracemalloc.stop()
        plain = min(plain_round_seconds(n, shapes) for _ in range(repeats))
        per_site[n], coord[n] = node, seconds
        cond = {"sites": n, "num_shares": k, "reconstruction_threshold": t, "all_to_all": chosen.all_to_all,
                "privacy_failure_bound": float(chosen.privacy_failure),
                "correctness_failure_bound": float(chosen.correctness_failure),
                "assumptions": {"corrupt_fraction": a.corrupt_fraction, "dropout_fraction": a.dropout_fraction,
                                "security_bits": a.security_bits, "correctness_bits": a.correctness_bits},
                "update_weights": int(sum(math.prod(s) for s in shapes)),
                "measure": "CPU seconds (process_time), best of repeats, Flower's own SecAgg+ functions"}
        out[f"secagg_node_cpu_seconds.{n}_sites"] = figure(node, "s", conditions=cond | {
            "work": "2 key pairs, 2 x Shamir k shares, k-1 x (ECDH + encrypt + decrypt + ECDH + "
                    "pairwise mask), private mask, quantisation; without SecAgg+ none of it"})
        out[f"secagg_coordinator_cpu_seconds_per_round.{n}_sites"] = figure(seconds, "s", conditions=cond | {
            "dropped_nodes": d, "per_n_log2_n": seconds / (n * math.log2(n)),
            "peak_traced_mib": peak / 2**20, "without_secagg_seconds": plain,
            "work": "sum n masked vectors, rebuild n secrets from t shares, remove n - d private "
                    "masks and the k-1 pairwise masks of each of the d assumed dropouts"})
    small, large = min(sites), max(sites)
    out["secagg_node_cpu_seconds.ratio_largest_vs_smallest"] = figure(
        per_site[large] / per_site[small], "x", target=TARGET_PER_SITE,
        conditions={"largest": large, "smallest": small,
                    "per_site_seconds": {str(n): per_site[n] for n in sites}})
    norm = {n: coord[n] / (n * math.log2(n)) for n in sites}
    out["secagg_coordinator_per_n_log_n.ratio_largest_vs_smallest"] = figure(
        norm[large] / norm[small], "x", target=1.0,
        conditions={"cost_per_n_log2_n": {str(n): norm[n] for n in sites},
                    "meaning": "<= 1: the coordinator's round grows no faster than n log n"})
    return out
