"""Gates over experts: input-dependent softmax gates, architecture gate logits, AFTB mixing.

`mix(weights, experts)` combines expert outputs; `aftb_mix` does the same with STEM's
All-Forward-Task-specific-Backward rule: every expert contributes forward, but the
gradient reaches only the experts marked in `keep` (the gate's own task's and the
shared ones); the others are seen through stop_gradient.
"""
from __future__ import annotations

import keras
import numpy as np
from keras import ops

from mdmt_tf.layers._util import check_positive_int, check_units, clone_initializer, register
from mdmt_tf.layers.records import ArchValue


def mix(weights, experts):
    """weights [B, G, E] x experts [B, E, H] -> [B, G, H]."""
    return ops.einsum("bge,beh->bgh", ops.cast(weights, experts.dtype), experts)


def aftb_mix(weights, experts, keep):
    """Like `mix`, but gradients flow only into experts where `keep` is 1.

    keep: [G, E] or [B, G, E] of 0/1. The forward value equals mix(weights, experts) up to
    float rounding (it is the sum of two einsums); the gradient w.r.t. expert e through gate g
    is zero where keep[g, e] == 0. Gradients w.r.t. the weights flow through every expert.
    """
    weights = ops.cast(weights, experts.dtype)
    keep = ops.cast(keep, experts.dtype)
    kept = mix(weights * keep, experts)
    held = mix(weights * (1.0 - keep), ops.stop_gradient(experts))
    return kept + held


@register
class SoftmaxGate(keras.layers.Layer):
    """`num_gates` softmax gates over `num_experts` experts, from one input.

    [B, in] -> [B, num_gates, num_experts]; each row of a gate sums to 1. One Dense (or a
    small MLP then Dense) computes all gates at once.

    Args:
      stop_gradient_input: read the input through stop_gradient (M3oE feeds its shared
        gates stop_gradient(bottom), so the gates do not train the bottom).
    """

    def __init__(self, num_experts, num_gates=1, hidden_units=(), stop_gradient_input=False,
                 kernel_initializer="glorot_uniform", bias_initializer="zeros", **kwargs):
        super().__init__(**kwargs)
        self.num_experts = check_positive_int(num_experts, "num_experts", "SoftmaxGate")
        self.num_gates = check_positive_int(num_gates, "num_gates", "SoftmaxGate")
        self.hidden_units = check_units(hidden_units, "hidden_units", "SoftmaxGate", allow_empty=True)
        self.stop_gradient_input = bool(stop_gradient_input)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.hidden = [keras.layers.Dense(u, activation="relu",
                                          kernel_initializer=clone_initializer(self.kernel_initializer, i),
                                          bias_initializer=clone_initializer(self.bias_initializer, i),
                                          dtype=self.dtype_policy, name=f"hidden_{i}")
                       for i, u in enumerate(self.hidden_units)]
        last = len(self.hidden_units)
        self.logits = keras.layers.Dense(self.num_gates * self.num_experts,
                                         kernel_initializer=clone_initializer(self.kernel_initializer, last),
                                         bias_initializer=clone_initializer(self.bias_initializer, last),
                                         dtype=self.dtype_policy, name="logits")

    def build(self, input_shape):
        shape = tuple(input_shape)
        for layer in self.hidden:
            layer.build(shape)
            shape = shape[:-1] + (layer.units,)
        self.logits.build(shape)

    def call(self, x):
        if self.stop_gradient_input:
            x = ops.stop_gradient(x)
        for layer in self.hidden:
            x = layer(x)
        logits = ops.reshape(self.logits(x), (-1, self.num_gates, self.num_experts))
        return ops.softmax(ops.cast(logits, "float32"), axis=-1)

    def get_config(self):
        return {**super().get_config(), "num_experts": self.num_experts, "num_gates": self.num_gates,
                "hidden_units": list(self.hidden_units), "stop_gradient_input": self.stop_gradient_input,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer)}


@register
class GateLogits(keras.layers.Layer):
    """Input-independent gates: softmax of learned logits [num_gates, num_experts].

    The logits are architecture variables (listed in `architecture_weights`), searched by
    the bi-level trainer like DARTS' mixing weights. call(x) broadcasts them to
    [B, num_gates, num_experts] (x only supplies the batch size).
    """

    def __init__(self, num_experts, num_gates=1, initializer="zeros", **kwargs):
        super().__init__(**kwargs)
        self.num_experts = check_positive_int(num_experts, "num_experts", "GateLogits")
        self.num_gates = check_positive_int(num_gates, "num_gates", "GateLogits")
        self.initializer = keras.initializers.get(initializer)

    def build(self, input_shape=None):
        self.gate_logits = self.add_weight(name="gate_logits", shape=(self.num_gates, self.num_experts),
                                           initializer=self.initializer)

    @property
    def architecture_weights(self):
        return [self.gate_logits]

    def architecture_values(self) -> list[ArchValue]:
        return [ArchValue("gate_logits", self.name, np.asarray(ops.convert_to_numpy(self.gate_logits)))]

    def call(self, x):
        weights = ops.softmax(ops.cast(self.gate_logits, "float32"), axis=-1)
        return ops.broadcast_to(weights[None], (ops.shape(x)[0], self.num_gates, self.num_experts))

    def get_config(self):
        return {**super().get_config(), "num_experts": self.num_experts, "num_gates": self.num_gates,
                "initializer": keras.initializers.serialize(self.initializer)}
