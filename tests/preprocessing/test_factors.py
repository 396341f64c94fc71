"""Motion factors and the appearance matrix (docs/method.md#prep, paper §3.3 / Eq. 3)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from preprocessing.factors import appearance_factor, appearance_matrix, motion_factors


def test_motion_factors_match_a_hand_computation():
    z = np.zeros((3, 2, 1, 2), np.float32)
    z[1, 0, 0, 0] = 3.0  # frame 0 -> 1: one element moves by 3 and one by 4: ||.|| = 5
    z[1, 1, 0, 1] = 4.0
    z[2] = z[1]  # frame 1 -> 2: nothing changes
    z[2, 0, 0, 1] = -1.0  # ... except one element by 1
    m = motion_factors(z)
    assert m.dtype == np.float32 and m.shape == (2,)
    np.testing.assert_allclose(m, [5.0, 1.0], rtol=0, atol=1e-6)


def test_motion_factors_are_frobenius_norms_of_consecutive_differences():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(8, 4, 8, 16)).astype(np.float32)
    expected = [math.sqrt(sum(float(v) ** 2 for v in (z[f + 1] - z[f]).ravel())) for f in range(7)]
    np.testing.assert_allclose(motion_factors(z), expected, rtol=1e-5)


def test_motion_factor_scales_with_the_latent_change():
    z = np.zeros((4, 4, 2, 2), np.float32)
    z[1], z[2], z[3] = 1.0, 3.0, 3.0  # step of 1, step of 2, no step; each over 16 elements
    np.testing.assert_allclose(motion_factors(z), [4.0, 8.0, 0.0], atol=1e-6)


def test_motion_needs_two_frames():
    with pytest.raises(ValueError, match="F>=2"):
        motion_factors(np.zeros((1, 4, 2, 2), np.float32))


def test_appearance_matrix_matches_numpy_on_known_features():
    # frame 0 and 1 identical direction (different lengths), frame 2 orthogonal, frame 3 opposite
    feats = np.array([[1.0, 0.0, 0.0], [5.0, 0.0, 0.0], [0.0, 2.0, 0.0], [-1.0, 0.0, 0.0]])
    a = appearance_matrix(feats)
    expected = np.array([[1, 1, 0, -1], [1, 1, 0, -1], [0, 0, 1, 0], [-1, -1, 0, 1]], np.float32)
    assert a.dtype == np.float32 and a.shape == (4, 4)
    np.testing.assert_allclose(a, expected, atol=1e-7)
    assert appearance_factor(a) == pytest.approx(2.0)  # γa = 1 - A[0, F-1]


def test_appearance_matrix_is_cosine_similarity_symmetric_unit_diagonal():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(32, 384)).astype(np.float32) * rng.uniform(0.1, 50, size=(32, 1))
    feats[5], feats[6] = feats[3] * 7.3, feats[3] * -0.01  # same look as frame 3, and its opposite
    a = appearance_matrix(feats)
    g = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    np.testing.assert_allclose(a, g @ g.T, atol=1e-5)
    assert np.array_equal(a, a.T)  # exactly, not just approximately
    assert np.all(np.diag(a) == 1.0)
    assert (a[3, 5], a[5, 3], a[3, 6], a[6, 5]) == (1.0, 1.0, -1.0, -1.0)  # cosines of ±1, exactly


def test_appearance_factor_of_a_static_clip_is_zero():
    feats = np.tile(np.arange(1, 9, dtype=np.float32), (8, 1))
    assert appearance_factor(appearance_matrix(feats)) == pytest.approx(0.0, abs=1e-6)
