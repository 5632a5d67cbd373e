"""Hashes of weight arrays, as audit logs record them (no torch: the node's gate uses it too)."""

from __future__ import annotations

import hashlib

import numpy as np


def weights_sha256(arrays: list[np.ndarray]) -> str:
    """SHA-256 over each array's dtype, shape and bytes, in order."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()
