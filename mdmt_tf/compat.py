"""Every use of a private Keras, TensorFlow or Keras Tuner API, in one place.

Each is a name with a leading underscore (or a `.src` module) that a release may rename or
drop without notice; tests/test_compat.py pins the behaviour each one is relied on for, so
an upgrade that breaks one fails there, by name, rather than somewhere deep in a run.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import keras
import tensorflow as tf


def sublayers(layer: keras.layers.Layer) -> list:
    """Every layer inside `layer` (its sub-layers, theirs, and so on; not itself). Keras'
    `Layer._flatten_layers`: the public `layers` property lists direct children only."""
    return list(layer._flatten_layers(include_self=False))


def in_multi_worker_mode() -> bool:
    """Whether the current tf.distribute strategy spans several workers
    (`StrategyExtended._in_multi_worker_mode`; False outside a strategy)."""
    extended = tf.distribute.get_strategy().extended
    return bool(getattr(extended, "_in_multi_worker_mode", lambda: False)())


class NoSymbolicBuild:
    """A mix-in for keras.Model subclasses that compute their own loss and metrics: Keras'
    `Trainer._maybe_symbolic_build` builds compiled losses / metrics on a sample batch,
    which under a distribution strategy it first all-reduces (failing on a dict of integer
    features). Such models have none to build."""

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        return


def hyperband_iteration_trials(oracle) -> int:
    """The trials of one Hyperband iteration of a keras_tuner HyperbandOracle: the sum of
    its brackets' sizes over their rounds (`_get_num_brackets`, `_get_num_rounds`,
    `_get_size`)."""
    return sum(oracle._get_size(bracket, r) for bracket in range(oracle._get_num_brackets())
               for r in range(oracle._get_num_rounds(bracket)))


@contextlib.contextmanager
def keras_tuner_debug(enabled: bool) -> Iterator[None]:
    """Keras Tuner prints a failed trial's traceback only in debug mode
    (`keras_tuner.src.config.DEBUG`); set it for the duration of a search."""
    from keras_tuner.src import config

    previous = config.DEBUG
    config.DEBUG = bool(enabled)
    try:
        yield
    finally:
        config.DEBUG = previous
