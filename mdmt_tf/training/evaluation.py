"""Evaluation per (domain, task): AUC and logloss, their aggregates, and STEM's split by
relative feedback.

Conventions (also in metrics.json):
  auc / logloss["<domain>/<task>"]   per pair; AUC is None (null) when the pair has only
                                     one class, and such pairs are left out of the means
  task_auc / task_logloss[task]      pooled over domains
  domain_auc / domain_logloss[dom]   mean over the domain's tasks
  mean_auc / mean_logloss            unweighted mean over pairs
  weighted_auc / weighted_logloss    mean over pairs weighted by the pair's sample count
  nonfinite_predictions[pair]        how many of the pair's predictions are NaN or +-inf;
                                     only pairs with some ({} when every prediction is finite)
Non-finite predictions: a pair (or task, pooled) with any NaN / +-inf prediction has AUC
and logloss NaN, whatever its labels (NaN is not None: it never means "one class"), and
every mean that includes such a pair is NaN; None pairs are still left out. metrics.json
has no NaN (JSON has none): report.metrics writes it as null, like a one-class AUC, and
nonfinite_predictions tells the two apart.
AUC is exact (Mann-Whitney with average ranks for ties).
"""
from __future__ import annotations

import numpy as np

EPSILON = 1e-7


def auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """Exact AUC; None with one class only, NaN when a score is NaN or infinite."""
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if not np.isfinite(scores).all():
        return float("nan")
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(scores.size, dtype=np.float64)
    # average ranks over ties
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [scores.size]])
    average = (starts + ends + 1) / 2.0  # 1-based average rank of each tie group
    ranks[order] = np.repeat(average, ends - starts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def logloss(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean binary cross-entropy (probabilities clipped to [EPSILON, 1 - EPSILON]); NaN when a
    probability is NaN or infinite (clipping would hide it)."""
    p = np.asarray(probs, dtype=np.float64).ravel()
    if not np.isfinite(p).all():
        return float("nan")
    p = np.clip(p, EPSILON, 1 - EPSILON)
    y = np.asarray(labels, dtype=np.float64).ravel()
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def _mean(values, weights=None):
    """Weighted mean of the values that are not None (None if there are none); NaN if any is NaN."""
    pairs = [(v, w) for v, w in zip(values, weights or [1.0] * len(values)) if v is not None]
    if not pairs:
        return None
    v, w = np.array(pairs, dtype=np.float64).T
    return float((v * w).sum() / w.sum())


def evaluate(probs: dict, labels: dict, domain: np.ndarray, domains: list[str], tasks: list[str]) -> dict:
    """probs / labels {task: [N] or [N, 1]}, domain [N] indices into `domains`."""
    domain = np.asarray(domain).ravel()
    out: dict = {"auc": {}, "logloss": {}, "count": {}, "positives": {}, "nonfinite_predictions": {}}
    for d_index, d_name in enumerate(domains):
        rows = domain == d_index
        for task in tasks:
            key = f"{d_name}/{task}"
            y = np.asarray(labels[task]).ravel()[rows]
            p = np.asarray(probs[task]).ravel()[rows]
            out["count"][key] = int(rows.sum())
            out["positives"][key] = int(y.sum())
            nonfinite = int((~np.isfinite(p.astype(np.float64))).sum())
            if nonfinite:
                out["nonfinite_predictions"][key] = nonfinite
            out["auc"][key] = auc(y, p) if rows.any() else None
            out["logloss"][key] = logloss(y, p) if rows.any() else None
    keys = [k for k in out["auc"] if out["count"][k] > 0]
    counts = [out["count"][k] for k in keys]
    out["mean_auc"] = _mean([out["auc"][k] for k in keys])
    out["mean_logloss"] = _mean([out["logloss"][k] for k in keys])
    out["weighted_auc"] = _mean([out["auc"][k] for k in keys], counts)
    out["weighted_logloss"] = _mean([out["logloss"][k] for k in keys], counts)
    out["task_auc"] = {t: auc(labels[t], probs[t]) for t in tasks}
    out["task_logloss"] = {t: logloss(labels[t], probs[t]) for t in tasks}
    out["domain_auc"] = {d: _mean([out["auc"][f"{d}/{t}"] for t in tasks]) for d in domains}
    out["domain_logloss"] = {d: _mean([out["logloss"][f"{d}/{t}"] for t in tasks]) for d in domains}
    return out


# ----------------------------------------------------------- STEM's relative feedback
def relative_feedback_groups(prob_a: np.ndarray, prob_b: np.ndarray, buckets: int = 10,
                             threshold: int = 3) -> np.ndarray:
    """Split samples by the relative expected feedback of two tasks (STEM, AAAI 2024).

    Each task's single-task-model prediction is cut into `buckets` equal-frequency
    buckets; with gap = bucket_A - bucket_B, a sample is "A-overwhelming" (gap >=
    threshold), "B-overwhelming" (gap <= -threshold) or "comparable". Returns an array
    of those labels.
    """
    def bucket(p):
        ranks = np.argsort(np.argsort(np.asarray(p).ravel(), kind="mergesort"), kind="mergesort")
        return (ranks * buckets) // len(ranks)

    gap = bucket(prob_a) - bucket(prob_b)
    return np.where(gap >= threshold, "A-overwhelming", np.where(gap <= -threshold, "B-overwhelming", "comparable"))


def auc_by_group(probs: dict, labels: dict, groups: np.ndarray, tasks) -> dict:
    """{group: {task: AUC}} for the groups of relative_feedback_groups."""
    return {g: {t: auc(np.asarray(labels[t]).ravel()[groups == g], np.asarray(probs[t]).ravel()[groups == g])
                for t in tasks} for g in ("A-overwhelming", "comparable", "B-overwhelming")}
