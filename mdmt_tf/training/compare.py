"""`mdmt compare`: several models, several seeds, one split; mean +- std per (domain, task).

Every run is a normal training run (resumable) in OUT/runs/<model>/seed<k>. The table
always includes `popularity`, a no-model baseline: each item's positive rate per task on
the training split, (positives + 1 * global rate) / (impressions + 1), the global rate
for items never seen in training. When the single-task `mlp` is among the models, test
samples are also split by relative feedback (STEM) using its predictions, and every
model's AUC is reported per group.

Streamed data (--data shards:DIR) is compared without holding a split: the popularity
baseline and the cold-start shares come from passes over the encoded ids, so an item
below the vocabulary's min_count shares its OOV bucket's rate, and "never seen in
training" means "out of the vocabulary" (the same with the default min_count 1; hashed
fields have no vocabulary and are left out).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mdmt_tf.data.dataset import MDMTData
from mdmt_tf.data.stream import StreamedSplits
from mdmt_tf.log import LOG
from mdmt_tf.models import ModelConfig
from mdmt_tf.training.config import TrainConfig
from mdmt_tf.training.encoded import EncodedData, SplitData
from mdmt_tf.training.evaluation import auc_by_group, evaluate, relative_feedback_groups
from mdmt_tf.training.fit import Run

POPULARITY = "popularity"


def popularity_predictions(data: MDMTData, split: str = "test", item_column: str | None = None,
                           prior: float = 1.0) -> dict[str, np.ndarray]:
    """Each item's smoothed positive rate per task on the training split."""
    spec = data.spec
    item = item_column or _item_column(spec)
    train, target = data.splits.train, data.splits[split]
    out = {}
    for task in spec.tasks:
        rate = float(train[task].mean())
        grouped = train.groupby(item)[task].agg(["sum", "count"])
        smoothed = (grouped["sum"] + prior * rate) / (grouped["count"] + prior)
        out[task] = target[item].map(smoothed).fillna(rate).to_numpy(dtype=np.float64)
    return out


def _item_column(spec) -> str:
    return next((c for c in spec.sparse if "item" in c), spec.sparse[0])


def streamed_test(data: StreamedSplits, prior: float = 1.0, batch_size: int = 65_536):
    """(popularity predictions, labels, domain indices, {field: out-of-vocabulary mask}) of
    the test split, from one pass over the training split (per-id positives and impressions
    of the item field: memory of its table's rows) and one over the test split."""
    spec = data.spec
    item = _item_column(spec)
    rows = dict(data.schema.sparse)[item]
    counts = np.zeros(rows)
    sums = {t: np.zeros(rows) for t in spec.tasks}
    for features, labels in data.batches("train", batch_size):
        ids = features[item].numpy()
        counts += np.bincount(ids, minlength=rows)
        for task in spec.tasks:
            sums[task] += np.bincount(ids, weights=labels[task].numpy(), minlength=rows)
    # an id never seen in training: (0 + prior * rate) / (0 + prior), the global rate, as in memory
    smoothed = {t: (sums[t] + prior * sums[t].sum() / counts.sum()) / (counts + prior) for t in spec.tasks}
    fields = [n for n in spec.sparse if not spec.field_vocab(n).hashed]
    parts: dict[str, list] = {}
    for features, labels in data.batches("test", batch_size):
        ids = features[item].numpy()
        for task in spec.tasks:
            parts.setdefault(f"p/{task}", []).append(smoothed[task][ids])
            parts.setdefault(f"y/{task}", []).append(labels[task].numpy())
        parts.setdefault("domain", []).append(features[spec.domain].numpy())
        for name in fields:
            parts.setdefault(f"oov/{name}", []).append(features[name].numpy() < spec.field_vocab(name).oov_buckets)
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    return ({t: arrays[f"p/{t}"] for t in spec.tasks}, {t: arrays[f"y/{t}"] for t in spec.tasks}, arrays["domain"],
            {n: arrays[f"oov/{n}"] for n in fields})


def unseen_rows(data: MDMTData) -> dict[str, np.ndarray]:
    """Per sparse feature, the test rows whose id never appears in training."""
    train, test = data.splits.train, data.splits.test
    return {name: (~test[name].isin(set(train[name]))).to_numpy() for name in data.spec.sparse}


def cold_start_shares(data: MDMTData) -> dict[str, float]:
    """Share of test rows whose id (per sparse feature) never appears in training."""
    return {name: float(mask.mean()) for name, mask in unseen_rows(data).items()}


def cold_start_field(shares: dict[str, float], min_share: float = 0.05) -> str | None:
    """The sparse field with the largest share of test rows whose value never appears in
    training (a temporal split's new users, say), if that share is at least `min_share`."""
    field = max(shares, key=lambda name: shares[name], default=None)
    return field if field is not None and shares[field] >= min_share else None


def _summary(values: list) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values))


class Comparison:
    def __init__(self, models: list[ModelConfig], data: MDMTData | StreamedSplits, config: TrainConfig, out_dir,
                 seeds: int = 3, source: str = "", verbose: int | None = None):
        self.models, self.data, self.config = models, data, config
        self.out = Path(out_dir)
        self.seeds, self.source, self.verbose = int(seeds), source, verbose

    def run(self) -> dict:
        import dataclasses

        data, spec = self.data, self.data.spec
        tasks = list(spec.tasks)
        encoded: SplitData
        if isinstance(data, StreamedSplits):
            domains = data.domains
            popularity, labels, test_domain, unseen_by_field = streamed_test(data)
            encoded = data
            rows = {s: data.rows(s) for s in ("train", "val", "test")}
        else:
            domains = list(data.vocab.domains)
            index = {d: i for i, d in enumerate(domains)}
            test = data.splits.test
            test_domain = test[spec.domain].map(index).to_numpy()
            labels = {t: test[t].to_numpy() for t in tasks}
            popularity = popularity_predictions(data)
            unseen_by_field = unseen_rows(data)
            encoded = EncodedData.from_data(data)  # once for every run
            rows = {s: len(data.splits[s]) for s in ("train", "val", "test")}
        shares = {name: float(mask.mean()) for name, mask in unseen_by_field.items()}
        results: dict[str, list[dict]] = {POPULARITY: [evaluate(popularity, labels, test_domain, domains, tasks)]}
        predictions: dict[str, list[dict]] = {POPULARITY: [popularity]}
        timing: dict[str, list[float]] = {}
        for model in self.models:
            for seed in range(self.seeds):
                run_dir = self.out / "runs" / model.name / f"seed{seed}"
                LOG.info("compare: %s seed %d -> %s", model.name, seed, run_dir)
                payload = Run(model, encoded, dataclasses.replace(self.config, seed=seed), run_dir, source=self.source,
                              verbose=self.verbose, export=False, plots=False, save_predictions=True).run()
                results.setdefault(model.name, []).append(payload["test"])
                timing.setdefault(model.name, []).append(payload["train_seconds"])
                with np.load(run_dir / "test_predictions.npz") as saved:
                    predictions.setdefault(model.name, []).append({t: saved[t] for t in tasks})
        table = self._table(results, domains, tasks)
        report = {"data": self.source, "domains": domains, "tasks": tasks, "seeds": self.seeds,
                  "rows": rows, "cold_start": shares, "table": table,
                  "train_seconds": {m: float(np.mean(v)) for m, v in timing.items()}}
        if "mlp" in predictions and len(tasks) >= 2:
            report["relative_feedback"] = self._relative_feedback(predictions, labels, tasks)
        field = cold_start_field(shares)
        if field is not None:
            report["cold_start_auc"] = self._cold_start_auc(predictions, labels, test_domain, domains, tasks, field,
                                                            unseen_by_field[field])
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "compare.json").write_text(json.dumps(report, indent=1))
        write_outputs(report, self.out)
        return report

    @staticmethod
    def _table(results: dict, domains, tasks) -> dict:
        table = {}
        for name, runs in results.items():
            row = {}
            for d in domains:
                for t in tasks:
                    row[f"{d}/{t}"] = _summary([r["auc"][f"{d}/{t}"] for r in runs])
            row["mean_auc"] = _summary([r["mean_auc"] for r in runs])
            row["mean_logloss"] = _summary([r["mean_logloss"] for r in runs])
            table[name] = row
        return table

    @staticmethod
    def _cold_start_auc(predictions: dict, labels: dict, domain, domains, tasks, field: str, unseen) -> dict:
        """Mean AUC over (domain, task) pairs on the test rows whose `field` was seen in
        training and on those whose was not, per model (mean, std over seeds)."""
        out: dict = {"field": field, "rows": {"seen": int((~unseen).sum()), "unseen": int(unseen.sum())}, "auc": {}}
        for name, runs in predictions.items():
            out["auc"][name] = {
                part: _summary([evaluate({t: p[t][rows] for t in tasks}, {t: labels[t][rows] for t in tasks},
                                         domain[rows], domains, tasks)["mean_auc"] for p in runs])
                for part, rows in (("seen", ~unseen), ("unseen", unseen))}
        return out

    @staticmethod
    def _relative_feedback(predictions: dict, labels: dict, tasks) -> dict:
        reference = predictions["mlp"][0]
        groups = relative_feedback_groups(reference[tasks[0]], reference[tasks[1]])
        out = {"groups": {g: int((groups == g).sum()) for g in ("A-overwhelming", "comparable", "B-overwhelming")},
               "task_a": tasks[0], "task_b": tasks[1], "auc": {}}
        for name, runs in predictions.items():
            per_seed = [auc_by_group(p, labels, groups, tasks[:2]) for p in runs]
            out["auc"][name] = {g: {t: _summary([s[g][t] for s in per_seed]) for t in tasks[:2]}
                                for g in per_seed[0]}
        return out


def _cell(summary) -> str:
    mean, std = summary
    return "n/a" if mean is None else f"{mean:.4f} ± {std:.4f}"


def markdown(report: dict) -> str:
    from mdmt_tf.report.tables import markdown_table, ranked

    domains, tasks = report["domains"], report["tasks"]
    pairs = [f"{d}/{t}" for d in domains for t in tasks]
    headers = ["model"] + pairs + ["mean AUC", "mean logloss"]
    order = ranked(report)
    rows = [[m] + [_cell(report["table"][m][p]) for p in pairs]
            + [_cell(report["table"][m]["mean_auc"]), _cell(report["table"][m]["mean_logloss"])] for m in order]
    lines = [f"Test AUC, mean ± std over {report['seeds']} seed(s); data: {report['data']}; rows "
             f"{report['rows']}", "", markdown_table(headers, rows)]
    cold = ", ".join(f"{k} {v:.1%}" for k, v in report["cold_start"].items() if v > 0)
    lines += ["", f"Test rows whose id was never seen in training: {cold or 'none'}."]
    if "relative_feedback" in report:
        rf = report["relative_feedback"]
        groups = list(rf["groups"])
        headers = ["model"] + [f"{g} {t}" for g in groups for t in (rf["task_a"], rf["task_b"])]
        rows = [[m] + [_cell(rf["auc"][m][g][t]) for g in groups for t in (rf["task_a"], rf["task_b"])]
                for m in order if m in rf["auc"]]
        sizes = ", ".join(f"{g}: {n}" for g, n in rf["groups"].items())
        lines += ["", f"AUC by relative feedback (STEM; A = {rf['task_a']}, B = {rf['task_b']}; groups from the "
                      f"single-task MLP's predictions, 10 buckets, |gap| >= 3; sizes {sizes})", "",
                  markdown_table(headers, rows)]
    if "cold_start_auc" in report:
        cs = report["cold_start_auc"]
        rows = [[m, _cell(report["table"][m]["mean_auc"]), _cell(cs["auc"][m]["seen"]), _cell(cs["auc"][m]["unseen"])]
                for m in order if m in cs["auc"]]
        lines += ["", f"Mean AUC over the (domain, task) pairs on test rows whose {cs['field']} was seen in training "
                      f"({cs['rows']['seen']} rows) and never seen ({cs['rows']['unseen']} rows); a model can score "
                      "below both parts on all rows when its scores for the two groups are not on one scale", "",
                  markdown_table(["model", "all rows", f"{cs['field']} seen", f"{cs['field']} new"], rows)]
    return "\n".join(lines) + "\n"


def write_outputs(report: dict, out: Path) -> None:
    import csv

    from mdmt_tf.report.plots import compare_bars

    (out / "compare.md").write_text(markdown(report))
    pairs = [f"{d}/{t}" for d in report["domains"] for t in report["tasks"]] + ["mean_auc", "mean_logloss"]
    with open(out / "compare.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["model"] + [f"{p} {s}" for p in pairs for s in ("mean", "std")])
        for model, row in report["table"].items():
            writer.writerow([model] + [v for p in pairs for v in row[p]])
    compare_bars(report, out / "compare.png")
