"""The Frechet distance between two Gaussians fitted to feature sets (Heusel et al. 2017's FID formula, in
any feature space), in float64 with numpy only.

    FD = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))

Tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of S1 S2. Those are the eigenvalues of
R S2 R with R = S1^(1/2) (similar matrices), and R S2 R is symmetric positive semi-definite, so a symmetric
eigensolver gives them; rounding can push a zero eigenvalue slightly below 0, which is clamped to 0. A
sample covariance of fewer samples than dimensions is singular: that is fine here (no inverse is taken)."""
from typing import Tuple

import numpy as np
import torch


def feature_stats(features) -> Tuple[np.ndarray, np.ndarray]:
    """(mean [D], covariance [D, D]) in float64 of ``features`` [N, D] (N >= 2; unbiased covariance)."""
    x = features.detach().to("cpu", torch.float64).numpy() if torch.is_tensor(features) else \
        np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"feature_stats needs features [N >= 2, D], got shape {tuple(x.shape)}")
    mu = x.mean(0)
    centred = x - mu
    return mu, centred.T @ centred / (len(x) - 1)


def sqrt_psd(cov) -> np.ndarray:
    """The symmetric square root of a positive semi-definite matrix (negative rounding eigenvalues -> 0)."""
    w, v = np.linalg.eigh(_symmetric(cov))
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, cov1, mu2, cov2, sqrt_cov2=None) -> float:
    """FD between N(mu1, cov1) and N(mu2, cov2). ``sqrt_cov2``: sqrt_psd(cov2) when the caller has it (a fixed
    reference compared with many samples)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = _symmetric(cov1), _symmetric(cov2)
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != mu1.shape * 2:
        raise ValueError(f"frechet_distance: shapes differ: mu {mu1.shape} / {mu2.shape}, "
                         f"cov {cov1.shape} / {cov2.shape}")
    root = sqrt_psd(cov2) if sqrt_cov2 is None else np.asarray(sqrt_cov2, np.float64)
    eig = np.linalg.eigvalsh(_symmetric(root @ cov1 @ root))
    cross = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * cross, 0.0))


def _symmetric(m) -> np.ndarray:
    m = np.asarray(m, np.float64)
    return (m + m.T) / 2
