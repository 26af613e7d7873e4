"""Evaluate an exported SavedModel on a data source (`mdmt evaluate`).

The SavedModel's assets.extra/mdmt.json gives the spec and the domain order; the data is
scored through the `predict_raw` signature, i.e. through the same preprocessing graph a
server would run.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mdmt_tf.data.dataset import label_arrays, raw_feature_arrays
from mdmt_tf.data.sources import load_source, parse_source
from mdmt_tf.data.table import check_domains
from mdmt_tf.export.savedmodel import read_metadata
from mdmt_tf.spec import DatasetSpec
from mdmt_tf.training.evaluation import evaluate


def score_raw(signature, raw: dict, batch_size: int = 8192) -> dict:
    import tensorflow as tf

    n = len(next(iter(raw.values())))
    parts: dict[str, list] = {}
    for start in range(0, n, batch_size):
        out = signature(**{k: tf.constant(v[start:start + batch_size]) for k, v in raw.items()})
        for task, value in out.items():
            parts.setdefault(task, []).append(value.numpy().reshape(-1))
    return {task: np.concatenate(v) for task, v in parts.items()}


def evaluate_savedmodel(model_dir, source: str, spec_path=None, split_seed: int = 0, split: str = "random",
                        which: str = "test"):
    import tensorflow as tf

    meta = read_metadata(model_dir)
    spec = DatasetSpec.from_yaml(spec_path) if spec_path else DatasetSpec.from_dict(meta["spec"])
    kind, _ = parse_source(source)
    if spec_path is None and kind in ("csv", "tfrecord"):
        spec_path = Path(model_dir) / "assets.extra" / "spec.yaml"  # the spec the model was trained with
    _, splits = load_source(source, spec_path, split_seed=split_seed, split=split)
    table = splits[which]
    domains = list(meta["domains"])
    check_domains(table, spec, domains, splits.sources[which])
    loaded = tf.saved_model.load(str(model_dir))
    probs = score_raw(loaded.signatures["predict_raw"], raw_feature_arrays(table, spec))
    index = {d: i for i, d in enumerate(domains)}
    domain = table[spec.domain].map(index).to_numpy()
    return evaluate(probs, label_arrays(table, spec), domain, domains, list(spec.tasks)), domains, list(spec.tasks)

