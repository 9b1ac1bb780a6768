"""Metrics for generated images.

- ``judge(dataset)``: the GAN judge of 'mnist', 'fashion-mnist' or 'stacked-mnist' (``JUDGED``): a small
  classifier fastgen trains on first use and caches, and ``Judge.score(images, labels=None)``: the Frechet
  distance in its feature space (with ``Judge.floor``, real against real), mode coverage, the KL of the mode
  histogram to the data's, confidence and label accuracy (fastgen/metrics/judges.py says how each is defined).
- ``frechet_distance`` / ``feature_stats``: the Frechet distance of two Gaussians, float64, numpy only.
- ``python -m fastgen.metrics [DATASET ...]``: each judge's test accuracy, floor and training time.
"""
from fastgen.metrics.frechet import feature_stats, frechet_distance
from fastgen.metrics.judges import JUDGED, Judge, JudgeCacheError, cache_folder, clear_memory, judge, kl_divergence

__all__ = ["judge", "JUDGED", "Judge", "JudgeCacheError", "cache_folder", "clear_memory", "frechet_distance",
           "feature_stats", "kl_divergence"]
