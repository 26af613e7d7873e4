"""Evaluate an exported SavedModel on a data source (`mdmt evaluate`).

The SavedModel's assets.extra/mdmt.json gives the spec and the domain order; the data is
scored by mdmt_tf.export.scoring (the `predict_raw` signature: the same preprocessing graph
a server would run), whatever the model's input dtypes (a pipeline model reads int64 ids).
"""
from __future__ import annotations

from pathlib import Path

from mdmt_tf.data.dataset import label_arrays, raw_feature_arrays
from mdmt_tf.data.sources import load_source, parse_source
from mdmt_tf.data.table import check_domains
from mdmt_tf.export.scoring import SavedModelScorer
from mdmt_tf.spec import DatasetSpec
from mdmt_tf.training.evaluation import evaluate


def evaluate_savedmodel(model_dir, source: str, spec_path=None, split_seed: int = 0, split: str = "random",
                        which: str = "test"):
    """(metrics of split `which`, domains, tasks) of the SavedModel in `model_dir` on `source`."""
    scorer = SavedModelScorer(model_dir)
    spec = DatasetSpec.from_yaml(spec_path) if spec_path else scorer.spec
    kind, _ = parse_source(source)
    if spec_path is None and kind in ("csv", "tfrecord"):
        spec_path = Path(model_dir) / "assets.extra" / "spec.yaml"  # the spec the model was trained with
    _, splits = load_source(source, spec_path, split_seed=split_seed, split=split)
    table = splits[which]
    domains = scorer.domains
    check_domains(table, spec, domains, splits.sources[which])
    probs = scorer.score(raw_feature_arrays(table, spec))
    index = {d: i for i, d in enumerate(domains)}
    domain = table[spec.domain].astype(str).map(index).to_numpy()
    return evaluate(probs, label_arrays(table, spec), domain, domains, list(spec.tasks)), domains, list(spec.tasks)
