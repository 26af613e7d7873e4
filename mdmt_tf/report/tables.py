"""Plain-text / markdown tables for the terminal and for docs."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub-flavoured markdown table, columns padded so it also reads in a terminal."""
    cells = [[_cell(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def data_summary(spec, splits) -> str:
    """Rows and positive rate per task, per split and domain."""
    headers = ["split", spec.domain, "rows"] + [f"{t} rate" for t in spec.tasks]
    from mdmt_tf.data.vocab import natural_key

    order = list(spec.domains) if spec.domains else None
    rows = []
    for split, table in splits.items():
        groups = dict(list(table.groupby(spec.domain)))
        for domain in (order or sorted(groups, key=natural_key)):
            if domain not in groups:
                continue
            part = groups[domain]
            rows.append([split, domain, len(part)] + [float(part[t].mean()) for t in spec.tasks])
        rows.append([split, "(all)", len(table)] + [float(table[t].mean()) for t in spec.tasks])
    return markdown_table(headers, rows)


def auc_table(result: dict, domains, tasks, title: str = "AUC") -> str:
    """Per-domain x per-task AUC (and logloss) table of an evaluation result."""
    headers = ["domain"] + [f"{t} AUC" for t in tasks] + [f"{t} logloss" for t in tasks] + ["rows"]
    rows = []
    for d in domains:
        row = [d] + [_fmt(result["auc"].get(f"{d}/{t}")) for t in tasks]
        row += [_fmt(result["logloss"].get(f"{d}/{t}")) for t in tasks]
        row.append(result.get("count", {}).get(f"{d}/{tasks[0]}", ""))
        rows.append(row)
    if "task_auc" in result:
        rows.append(["(pooled)"] + [_fmt(result["task_auc"][t]) for t in tasks]
                    + [_fmt(result["task_logloss"][t]) for t in tasks] + [""])
    table = markdown_table(headers, rows)
    return (f"{title}: mean over (domain, task) pairs {_fmt(result['mean_auc'])}, "
            f"sample-weighted {_fmt(result.get('weighted_auc'))}, mean logloss {_fmt(result['mean_logloss'])}\n{table}")


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def ranked(report: dict) -> list[str]:
    """The models of a comparison report (mdmt_tf.training.compare) by mean test AUC, best
    first; a model whose mean AUC is NaN (non-finite predictions) or None ranks last."""
    def key(model):
        mean = report["table"][model]["mean_auc"][0]
        return -mean if mean is not None and np.isfinite(mean) else np.inf

    return sorted(report["table"], key=key)
