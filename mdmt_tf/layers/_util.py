"""Small helpers shared by the layers (not layers themselves)."""
from __future__ import annotations

import keras
from keras import ops

PACKAGE = "mdmt_tf"


def register(cls):
    """Register a layer / initializer for Keras serialization under the mdmt_tf package."""
    return keras.saving.register_keras_serializable(package=PACKAGE)(cls)


def row_source(variable):
    """What to gather a variable's rows from without reading it whole: the tf.Variable behind
    a Keras variable (or, inside a stateless scope, the scope's tensor); for a tf.distribute
    MirroredVariable, the copy on the current device (every copy holds the same values). A
    gather on the MirroredVariable itself falls back to a read of the whole variable
    (measured: a 10M x 16 table made a MultiWorkerMirrored step 225 ms against 4 ms); on the
    copy it is a ResourceGather, and the gradient still reaches the mirrored variable as
    IndexedSlices."""
    value = variable.value if isinstance(variable, keras.Variable) else variable
    local = getattr(value, "_get_on_device_or_primary", None)
    return local() if local is not None else value


def clone_initializer(initializer, index: int):
    """A fresh copy of `initializer` for the index-th weight of a layer.

    A seeded Keras initializer returns the same values at every call, so one instance
    shared by several weights would make same-shaped weights identical. Each weight gets
    its own copy; an explicit integer seed is offset by `index`, an unseeded one draws a
    new seed (deterministic under keras.utils.set_random_seed).
    """
    config = keras.initializers.serialize(initializer)
    inner = dict(config.get("config") or {})
    if isinstance(inner.get("seed"), int) and not isinstance(inner.get("seed"), bool):
        inner["seed"] = inner["seed"] + 7919 * index
    return keras.initializers.deserialize({**config, "config": inner})


def check_positive_int(value, name: str, layer: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{layer}: `{name}` must be an integer >= {minimum}, received {name}={value!r}")
    return value


def check_units(units, name: str, layer: str, allow_empty: bool = False) -> tuple[int, ...]:
    if isinstance(units, int):
        units = (units,)
    units = tuple(units)
    if (not units and not allow_empty) or any(isinstance(u, bool) or not isinstance(u, int) or u < 1 for u in units):
        raise ValueError(f"{layer}: `{name}` must be a {'possibly empty ' if allow_empty else 'non-empty '}list of "
                         f"positive integers, received {name}={units!r}")
    return units


NORMS = (None, "layer")  # the normalisations ExpertGroup and Towers offer


def check_norm(norm, layer: str):
    if norm not in NORMS:
        raise ValueError(f"{layer}: `norm` must be one of {NORMS}, received norm={norm!r}")
    return norm


def grouped_layer_norm(x, gamma, beta, epsilon: float):
    """LayerNorm over the last axis with a separate affine (gamma, beta) per group: x [..., G, H]
    (or [..., D, T, H]) and gamma / beta broadcastable to x's trailing axes, e.g. [G, H] for
    G experts each with its own LayerNorm. Statistics in float32 whatever the compute dtype
    (as Keras' LayerNormalization does); the result has x's dtype."""
    dtype = x.dtype
    x32 = ops.cast(x, "float32")
    mean = ops.mean(x32, axis=-1, keepdims=True)
    variance = ops.mean(ops.square(x32 - mean), axis=-1, keepdims=True)
    normed = (x32 - mean) * ops.rsqrt(variance + epsilon)
    return ops.cast(normed * ops.cast(gamma, "float32") + ops.cast(beta, "float32"), dtype)


def select_by_domain(x, domain, num_domains: int):
    """x: [B, D, ...] -> [B, ...], each row's own domain. A one-hot product, so the
    unselected slices get exactly zero gradient and no gather of weights is needed."""
    onehot = ops.one_hot(domain, num_domains, dtype=x.dtype)
    onehot = ops.reshape(onehot, (-1, num_domains) + (1,) * (len(x.shape) - 2))
    return ops.sum(x * onehot, axis=1)
