"""Scoring a Keras model on encoded NumPy features, in batches, inside one tf.function."""
from __future__ import annotations

from typing import Callable

import tensorflow as tf

from mdmt_tf.batches import in_batches
from mdmt_tf.models.details import Details


def predictor(model, batch_size: int) -> Callable[[dict], dict]:
    """features {name: [N]} -> {task: probabilities [N]}, `batch_size` rows per call."""
    @tf.function(reduce_retracing=True)
    def call(features):
        return model(features, training=False)

    def predict(features: dict) -> dict:
        out = in_batches(lambda batch: call({k: tf.constant(v) for k, v in batch.items()}), features, batch_size)
        return {task: values.reshape(-1) for task, values in out.items()}

    return predict


def forward_details(model, features: dict, batch_size: int) -> Details | None:
    """The Details a model's forward reports (MDMTModel.forward) for every row, as NumPy;
    None for a model without `forward` (a MAMDR serving wrapper)."""
    forward = getattr(model, "forward", None)
    if forward is None:
        return None

    def arrays(batch):
        return forward({k: tf.constant(v) for k, v in batch.items()}, training=False)[1].arrays()

    return Details.from_arrays(in_batches(arrays, features, batch_size))
