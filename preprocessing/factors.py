"""The paper's motion and appearance factors (docs/method.md#prep), as pure numpy functions."""

from __future__ import annotations

import numpy as np


def motion_factors(latents: np.ndarray) -> np.ndarray:
    """m_f = ||z[f+1] - z[f]||_F over (C,h,w), f = 0..F-2, on the *scaled* latents [F,C,h,w].

    Stored raw (float32); the model config owns the ×10 scale and the rounding. The value
    grows with resolution (more latent elements), so compare factors at one resolution only.
    """
    z = np.asarray(latents, dtype=np.float64)
    if z.ndim < 2 or z.shape[0] < 2:
        raise ValueError(f"motion factors need latents [F>=2, ...], got shape {z.shape}")
    diff = (z[1:] - z[:-1]).reshape(z.shape[0] - 1, -1)
    return np.sqrt((diff * diff).sum(axis=1)).astype(np.float32)


def appearance_matrix(features: np.ndarray) -> np.ndarray:
    """A = g gᵀ with g the L2-normalised per-frame features [F,D] (paper Eq. 3): float32 [F,F],
    exactly symmetric with ones on the diagonal."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"appearance needs features [F,D], got shape {f.shape}")
    norms = np.linalg.norm(f, axis=1, keepdims=True)
    g = f / np.maximum(norms, 1e-12)
    a = g @ g.T
    a = np.clip((a + a.T) / 2.0, -1.0, 1.0)  # exact symmetry despite summation order
    np.fill_diagonal(a, 1.0)
    return a.astype(np.float32)


def appearance_factor(appearance: np.ndarray) -> float:
    """γa = 1 - A[0, F-1]: how far the last frame's look drifted from the first's."""
    return float(1.0 - appearance[0, -1])
