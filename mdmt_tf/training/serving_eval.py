"""Evaluate an exported SavedModel on a data source (`mdmt evaluate`).

The SavedModel's assets.extra/mdmt.json gives the spec and the domain order; the data is
scored by mdmt_tf.export.scoring (the `predict_raw` signature: the same preprocessing graph
a server would run), whatever the model's input dtypes (a pipeline model reads int64 ids).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mdmt_tf.data.dataset import label_arrays, raw_feature_arrays
from mdmt_tf.data.shards import shard_files
from mdmt_tf.data.sources import load_source, parse_source
from mdmt_tf.data.stream import read_columns
from mdmt_tf.data.table import check_domains
from mdmt_tf.errors import ConfigError, DataError
from mdmt_tf.export.scoring import SavedModelScorer
from mdmt_tf.spec import DatasetSpec
from mdmt_tf.training.evaluation import evaluate


def evaluate_savedmodel(model_dir, source: str, spec_path=None, split_seed: int = 0, split: str = "random",
                        which: str = "test"):
    """(metrics of split `which`, domains, tasks) of the SavedModel in `model_dir` on `source`."""
    scorer = SavedModelScorer(model_dir)
    spec = DatasetSpec.from_yaml(spec_path) if spec_path else scorer.spec
    kind, rest = parse_source(source)
    if kind == "shards":
        if split != "random":
            raise ConfigError("--split does not apply to --data shards:DIR (its train/val/test shards are the split)")
        return _evaluate_streamed(scorer, spec, shard_files(rest)[which]), scorer.domains, list(spec.tasks)
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


def _evaluate_streamed(scorer: SavedModelScorer, spec: DatasetSpec, files: list[str]) -> dict:
    """The metrics of the shards `files`, read and scored batch by batch: only each row's
    float32 probabilities, labels and domain index are kept (12-20 bytes a row)."""
    index = {d: i for i, d in enumerate(scorer.domains)}
    probs: dict[str, list] = {t: [] for t in spec.tasks}
    labels: dict[str, list] = {t: [] for t in spec.tasks}
    domain = []
    for path, offset, columns in read_columns(files, spec):
        codes = np.array([index.get(v, -1) for v in columns[spec.domain].tolist()], dtype=np.int64)
        if (codes < 0).any():
            first = int(np.flatnonzero(codes < 0)[0])
            raise DataError(f"domain value {columns[spec.domain][first]!r} never appears in the training split "
                            f"(known: {scorer.domains}); a model has no tower for it", source=path,
                            row=offset + first + 1, column=spec.domain)
        out = scorer.score({name: columns[name] for name in spec.features})
        for task in spec.tasks:
            probs[task].append(out[task])
            labels[task].append(columns[task].astype(np.float32))
        domain.append(codes)
    return evaluate({t: np.concatenate(v) for t, v in probs.items()}, {t: np.concatenate(v) for t, v in labels.items()},
                    np.concatenate(domain), scorer.domains, list(spec.tasks))
