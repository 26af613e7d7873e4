"""EncodedData: a dataset's splits as model inputs, with the preprocessing front that made them."""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from mdmt_tf.data.dataset import MDMTData
from mdmt_tf.data.stream import StreamedSplits
from mdmt_tf.models import FeatureSchema
from mdmt_tf.preprocessing import FeatureFront, encode


@dataclasses.dataclass
class EncodedData:
    """The splits as model inputs (ids / scaled floats), labels and domain indices, with the
    preprocessing front that produced them (exported in front of the model) and a few raw
    serialized examples (TF Serving warmup)."""

    spec: Any
    domains: list
    front: Any
    schema: FeatureSchema
    features: dict
    labels: dict
    domain: dict
    warmup: list

    @classmethod
    def from_data(cls, data: MDMTData) -> "EncodedData":
        """The library path: Keras lookup front built from the training split."""
        from mdmt_tf.data.readers import example_bytes

        front = FeatureFront.from_data(data.spec, data.vocab)
        features = {s: encode(front, data.raw_features(s)) for s in ("train", "val", "test")}
        labels = {s: data.labels(s) for s in ("train", "val", "test")}
        domain = {s: features[s][data.spec.domain] for s in ("train", "val", "test")}
        warmup = example_bytes(data.splits.val.head(32), data.spec, with_labels=False)
        return cls(data.spec, list(data.vocab.domains), front, FeatureSchema.from_data(data.spec, data.vocab),
                   features, labels, domain, warmup)

    def rows(self, split: str) -> int:
        return len(self.domain[split])

    def scorer(self, model, batch_size: int):
        """split -> ({task: probabilities [N]}, {task: labels [N]}, domain indices [N]) by
        `model` (one compiled forward for every call): the interface the streaming path
        (mdmt_tf.data.stream.StreamData) shares."""
        from mdmt_tf.training.predict import predictor

        predict = predictor(model, batch_size)
        return lambda split: (predict(self.features[split]), self.labels[split], self.domain[split])

    def sample(self, split: str, rows: int | None = None) -> dict[str, np.ndarray]:
        """The first `rows` encoded rows of a split (all by default)."""
        return {k: v[:rows] for k, v in self.features[split].items()}


def take(arrays: dict, index: np.ndarray) -> dict:
    """The rows `index` of every array."""
    return {k: v[index] for k, v in arrays.items()}


# a run's splits: in memory, or streamed from files (the same interface to the trainer,
# the scoring and the outputs)
SplitData = EncodedData | StreamedSplits
