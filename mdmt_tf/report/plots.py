"""PNG plots of a training run (matplotlib, Agg backend)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def auc_heatmap(result: dict, domains, tasks, path: Path, title: str = "test AUC") -> Path:
    grid = np.array([[np.nan if result["auc"].get(f"{d}/{t}") is None else result["auc"][f"{d}/{t}"]
                      for t in tasks] for d in domains], dtype=float)
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(tasks), 1.2 + 0.6 * len(domains)))
    finite = grid[np.isfinite(grid)]
    vmin, vmax = (finite.min() - 0.01, finite.max() + 0.01) if finite.size else (0.5, 1.0)
    image = ax.imshow(grid, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
    for i in range(len(domains)):
        for j in range(len(tasks)):
            text = "n/a" if np.isnan(grid[i, j]) else f"{grid[i, j]:.4f}"
            ax.text(j, i, text, ha="center", va="center", color="white", fontsize=10)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_yticks(range(len(domains)), domains)
    ax.set_xlabel("task")
    ax.set_ylabel("domain")
    ax.set_title(f"{title} (mean {result['mean_auc']:.4f})" if result.get("mean_auc") else title)
    fig.colorbar(image, ax=ax)
    return _save(fig, path)


def training_curves(history: list[dict], path: Path) -> Path:
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, style in (("loss", "-o"), ("arch_loss", "--s")):
        values = [h.get(key) for h in history]
        if any(v for v in values):
            axes[0].plot(epochs, [np.nan if v is None else v for v in values], style, label=key)
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("training loss (sum over domain, task pairs)")
    axes[0].legend()
    for key in ("val_mean_auc", "val_weighted_auc"):
        values = [h.get(key) for h in history]
        if any(v is not None for v in values):
            axes[1].plot(epochs, [np.nan if v is None else v for v in values], "-o", label=key)
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("validation AUC")
    axes[1].legend()
    fig.suptitle("training curves")
    return _save(fig, path)


def arch_trajectories(points: list[dict], path: Path) -> Path | None:
    """alpha / beta (sigmoid) over training steps (ArchitectureTrajectory's points: "step",
    "epoch" and one entry per ArchValue key, e.g. "alpha/domain"); one line per scalar or
    vector entry."""
    keys = [k for k in (points[0] if points else {}) if k not in ("step", "epoch")]
    if not keys:
        return None
    steps = [p["step"] for p in points]
    fig, ax = plt.subplots(figsize=(8, 4))
    for label in keys:
        values = np.array([np.ravel(p[label]) for p in points])
        for i in range(values.shape[1]):
            ax.plot(steps, values[:, i], label=label if values.shape[1] == 1 else f"{label}[{i}]")
    ax.set_xlabel("training step")
    ax.set_ylabel("sigmoid(value)")
    ax.set_title("architecture weights during training (alpha: amplitude, beta: balance)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def domain_means(values: np.ndarray, domain: np.ndarray, num_domains: int) -> np.ndarray:
    """[num_domains, units]: the mean of `values` [B, units] over each domain's rows (NaN
    for a domain without rows)."""
    values = np.asarray(values)
    return np.array([values[domain == i].mean(axis=0) if (domain == i).any() else np.full(values.shape[1], np.nan)
                     for i in range(num_domains)])


def gate_utilisation(gates: dict, domain: np.ndarray, domains, tasks, path: Path) -> Path | None:
    """Mean gate weight per expert, per domain, one panel per gate set and task; gates:
    {Gate.name: weights [B, G, E]} (mdmt_tf.models.details)."""
    panels = [(name, weights) for name, weights in gates.items() if np.ndim(weights) == 3]
    if not panels:
        return None
    n = sum(w.shape[1] for _, w in panels)
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 3.2), squeeze=False)
    k = 0
    for name, weights in panels:
        for t in range(weights.shape[1]):
            ax = axes[0, k]
            k += 1
            grid = domain_means(weights[:, t], domain, len(domains))
            top = max(float(np.nanmax(grid)), 1e-6)
            ax.imshow(grid, cmap="magma", vmin=0, vmax=top, aspect="auto")
            for i in range(grid.shape[0]):
                for j in range(grid.shape[1]):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="black" if grid[i, j] > 0.6 * top else "white")
            ax.set_xticks(range(grid.shape[1]))
            ax.set_yticks(range(len(domains)), domains)
            ax.set_xlabel("expert")
            ax.set_title(f"{name} gate, task {tasks[t] if t < len(tasks) else t}", fontsize=9)
    fig.suptitle("gate utilisation per domain (mean weight on each expert)")
    return _save(fig, path)


def gate_nu(scalings: dict, domain: np.ndarray, domains, tasks, path: Path) -> Path | None:
    """PEPNet's Gate NU scalings ({Scaling.name: values}): mean per domain and unit, one panel
    per EPNet input ([B, units]) and per PPNet layer and task ([B, tasks, units]); 1.0 leaves
    a unit as is."""
    panels = []
    for name, values in scalings.items():
        values = np.asarray(values)
        if values.ndim == 2:
            panels.append((name, values))
        elif values.ndim == 3:
            panels.extend((f"{name}, task {tasks[t] if t < len(tasks) else t}", values[:, t])
                          for t in range(values.shape[1]))
    if not panels:
        return None
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 1.0 + 0.9 * len(panels) * max(1, len(domains) / 3)),
                             squeeze=False)
    top = max(float(np.nanmax(v)) for _, v in panels)
    for ax, (title, values) in zip(axes[:, 0], panels):
        grid = domain_means(values, domain, len(domains))
        image = ax.imshow(grid, cmap="coolwarm", vmin=0, vmax=top, aspect="auto", interpolation="nearest")
        ax.set_yticks(range(len(domains)), domains)
        ax.set_title(f"{title} ({grid.shape[1]} units)", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.02)
    axes[-1, 0].set_xlabel("unit")
    fig.suptitle("PEPNet Gate NU scaling per domain (mean over validation samples)")
    return _save(fig, path)


def balance_weights(report: dict, path: Path) -> Path | None:
    """Each unit's loss-balancing weight per epoch (metrics.json's "balance": units and
    trajectory points {"epoch", "weights"})."""
    points = report.get("trajectory") or []
    if not points:
        return None
    epochs = [p["epoch"] for p in points]
    values = np.array([p["weights"] for p in points], dtype=float)
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, unit in enumerate(report["units"]):
        ax.plot(epochs, values[:, i], marker="o", markersize=3, label=unit)
    ax.set_xlabel("epoch")
    ax.set_ylabel("weight")
    meaning = {"UncertaintyWeighting": "exp(-s), s the learned log-variance", "GradNorm": "w (sums to the units)",
               "MetaBalance": "mean m_target / m_unit over shared weights"}.get(report["method"], "")
    ax.set_title(f"loss balancing ({report['method']}): {meaning}")
    ax.legend(fontsize=8, ncol=2)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def compare_bars(report: dict, path: Path) -> Path:
    """Mean AUC +- std per (domain, task) pair, one bar per model."""
    pairs = [f"{d}/{t}" for d in report["domains"] for t in report["tasks"]] + ["mean_auc"]
    from mdmt_tf.report.tables import ranked

    models = ranked(report)
    width = 0.8 / max(len(models), 1)
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(pairs) * max(1, len(models) / 4)), 4.5))
    low = 1.0
    for i, model in enumerate(models):
        means = [report["table"][model][p][0] or np.nan for p in pairs]
        stds = [report["table"][model][p][1] or 0 for p in pairs]
        low = min(low, np.nanmin(means))
        ax.bar(np.arange(len(pairs)) + i * width, means, width, yerr=stds, label=model, capsize=2)
    ax.set_xticks(np.arange(len(pairs)) + width * (len(models) - 1) / 2, pairs, rotation=30, ha="right")
    ax.set_ylim(max(0.0, low - 0.03), None)
    ax.set_ylabel("test AUC (mean ± std over seeds)")
    ax.set_title("model comparison per (domain, task)")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def tuner_objective(rows: list[dict], objective: str, path: Path) -> Path:
    """The objective of each trial (failed trials marked) and the best so far."""
    fig, ax = plt.subplots(figsize=(8, 4))
    x = np.arange(len(rows))
    values = np.array([np.nan if r[objective] is None else r[objective] for r in rows], dtype=float)
    ok = np.isfinite(values)
    ax.plot(x[ok], values[ok], "o", label=objective)
    best = np.fmax.accumulate(np.where(ok, values, -np.inf))
    ax.plot(x, np.where(np.isfinite(best), best, np.nan), "-", label="best so far")
    for i in x[~ok]:
        ax.axvline(i, color="red", alpha=0.3)
    ax.set_xticks(x, [r["trial"] for r in rows], rotation=90, fontsize=7)
    ax.set_xlabel("trial (red: failed)")
    ax.set_ylabel(objective)
    ax.set_title("Keras Tuner search")
    ax.legend()
    return _save(fig, path)
