"""Gates over experts: input-dependent softmax gates, DSelect-k gates, architecture gate
logits, AFTB mixing.

`mix(weights, experts)` combines expert outputs; `aftb_mix` does the same with STEM's
All-Forward-Task-specific-Backward rule: every expert contributes forward, but the
gradient reaches only the experts marked in `keep` (the gate's own task's and the
shared ones); the others are seen through stop_gradient.
"""
from __future__ import annotations

import math

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


def smooth_step(t, gamma: float):
    """DSelect-k's smooth step: 0 for t <= -gamma/2, 1 for t >= gamma/2, and in between the
    cubic -2 t^3 / gamma^3 + 3 t / (2 gamma) + 1/2 (value and slope continuous at both ends)."""
    half = gamma / 2.0
    t = ops.clip(t, -half, half)
    return -2.0 / gamma ** 3 * t * t * t + 1.5 / gamma * t + 0.5


def dselect_codes(num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """The binary encoding of DSelect-k over m = ceil(log2 n) bits, as two constants:
    bits [2^m, m] (bit j of code c, least significant first) and owner [2^m, n], the one-hot
    expert each code selects: code c selects expert c, and a code c >= n (no such expert when
    n is not a power of two) selects expert c - 2^(m-1), the code with its top bit cleared."""
    m = max(1, math.ceil(math.log2(num_experts)))
    codes = np.arange(2 ** m)
    bits = ((codes[:, None] >> np.arange(m)[None, :]) & 1).astype("float32")
    expert = np.where(codes < num_experts, codes, codes - 2 ** (m - 1))
    return bits, np.eye(num_experts, dtype="float32")[expert]


@register
class DSelectKGate(keras.layers.Layer):
    """`num_gates` per-example DSelect-k gates over `num_experts` experts (Hazimeh et al.,
    NeurIPS 2021), from one input: [B, in] -> [B, num_gates, num_experts], rows summing to 1
    (SoftmaxGate's contract).

    For each gate and example, k single-expert selectors each pick one expert through a
    binary code over m = ceil(log2 n) bits: selector i has logits z_i = W_i x + b_i (m of
    them) and puts on code c the weight r_i(c) = prod_j S(z_ij)^c_j (1 - S(z_ij))^(1 - c_j),
    S the smooth step (`smooth_step`, width gamma); the selectors are combined with
    softmax(alpha), alpha = A x + a (k logits): q = sum_i softmax(alpha)_i r_i. Once every
    |z_ij| >= gamma/2, r_i is one-hot and q weighs at most k experts.

    n not a power of two: the 2^m - n codes >= n would name experts that do not exist. The
    authors' code drops them (rows then sum to less than 1) and adds a loss
    sum 1 / (weight on real experts); here each such code c selects expert c - 2^(m-1)
    instead, so weight on a non-existent expert is impossible by construction, every row
    sums to 1 exactly, and a saturated selector is one-hot on a real expert. The price: at
    initialisation (every S near 1/2) experts n - 2^(m-1) .. 2^(m-1) - 1 own two codes and
    start with twice the others' weight (n = 3: 1/4, 1/2, 1/4).

    Training passes add `entropy_weight` times the selectors' entropy, sum over gates (those
    `active`, see call) and selectors of -sum_e r_i(e) log r_i(e), averaged over the batch
    (add_loss), which pushes each selector to one expert. The authors sum it over the batch;
    the mean keeps the weight independent of the batch size.

    Args:
      k: selectors per gate (at most k experts get weight); 1 <= k <= num_experts.
      gamma: width of the smooth step's cubic part (the authors' default 1.0).
      entropy_weight: lambda of the entropy regulariser; 0 turns it off.
      stop_gradient_input: read the input through stop_gradient (as SoftmaxGate).
      selector_initializer / combination_initializer: of the z (kernel and bias) and alpha
        Dense layers; by default U(-gamma/100, gamma/100) and U(-0.05, 0.05) as in the
        authors' code (the selectors start undecided, S(z) near 1/2). With k = 1 there is
        no alpha (the one selector is the gate).
    """

    def __init__(self, num_experts, num_gates=1, k=2, gamma=1.0, entropy_weight=0.0, stop_gradient_input=False,
                 selector_initializer=None, combination_initializer=None, **kwargs):
        super().__init__(**kwargs)
        self.num_experts = check_positive_int(num_experts, "num_experts", "DSelectKGate", minimum=2)
        self.num_gates = check_positive_int(num_gates, "num_gates", "DSelectKGate")
        self.k = check_positive_int(k, "k", "DSelectKGate")
        if self.k > self.num_experts:
            raise ValueError(f"DSelectKGate: `k` must be at most num_experts={self.num_experts}, received k={k!r}")
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma > 0:
            raise ValueError(f"DSelectKGate: `gamma` must be a number > 0, received gamma={gamma!r}")
        if isinstance(entropy_weight, bool) or not isinstance(entropy_weight, (int, float)) or entropy_weight < 0:
            raise ValueError(f"DSelectKGate: `entropy_weight` must be a number >= 0, "
                             f"received entropy_weight={entropy_weight!r}")
        self.gamma = float(gamma)
        self.entropy_weight = float(entropy_weight)
        self.stop_gradient_input = bool(stop_gradient_input)
        self.selector_initializer = keras.initializers.get(
            selector_initializer or keras.initializers.RandomUniform(-self.gamma / 100, self.gamma / 100))
        self.combination_initializer = keras.initializers.get(
            combination_initializer or keras.initializers.RandomUniform(-0.05, 0.05))
        self.bits, self.owner = dselect_codes(self.num_experts)
        self.num_bits = self.bits.shape[1]
        g, k, m = self.num_gates, self.k, self.num_bits
        self.selector_logits = keras.layers.Dense(g * k * m,
                                                  kernel_initializer=clone_initializer(self.selector_initializer, 0),
                                                  bias_initializer=clone_initializer(self.selector_initializer, 1),
                                                  dtype=self.dtype_policy, name="selector_logits")
        self.combination_logits = None if k == 1 else keras.layers.Dense(  # k = 1: the one selector is the gate
            g * k, kernel_initializer=clone_initializer(self.combination_initializer, 0),
            bias_initializer=clone_initializer(self.combination_initializer, 1), dtype=self.dtype_policy,
            name="combination_logits")

    def build(self, input_shape):
        self.selector_logits.build(tuple(input_shape))
        if self.combination_logits is not None:
            self.combination_logits.build(tuple(input_shape))

    def selectors(self, x):
        """-> (combination weights softmax(alpha) [B, G, k], selector outputs r [B, G, k, n]),
        in float32."""
        if self.stop_gradient_input:
            x = ops.stop_gradient(x)
        g, k, m = self.num_gates, self.k, self.num_bits
        z = ops.reshape(ops.cast(self.selector_logits(x), "float32"), (-1, g, k, 1, m))
        s = smooth_step(z, self.gamma)
        bits = ops.convert_to_tensor(self.bits)  # [2^m, m]
        codes = ops.prod(bits * s + (1.0 - bits) * (1.0 - s), axis=-1)  # [B, G, k, 2^m]
        r = ops.einsum("bgkc,ce->bgke", codes, ops.convert_to_tensor(self.owner))
        if self.combination_logits is None:
            return ops.ones_like(r[..., 0]), r
        alpha = ops.reshape(ops.cast(self.combination_logits(x), "float32"), (-1, g, k))
        return ops.softmax(alpha, axis=-1), r

    def call(self, x, training=None, active=None):
        """active: optional [B, num_gates] of 0/1, the gates each example actually uses (M3oE
        computes a gate per (domain, task) and keeps the example's own domain's): the entropy
        regulariser counts only those. The output is the same either way."""
        combination, r = self.selectors(x)
        if training and self.entropy_weight:
            entropy = -ops.sum(r * ops.log(ops.maximum(r, 1e-12)), axis=(2, 3))  # [B, G]
            if active is not None:
                entropy = entropy * ops.cast(active, "float32")
            batch = ops.cast(ops.shape(entropy)[0], "float32")
            self.add_loss(self.entropy_weight * ops.sum(entropy) / ops.maximum(batch, 1.0))
        return ops.einsum("bgk,bgke->bge", combination, r)

    def get_config(self):
        return {**super().get_config(), "num_experts": self.num_experts, "num_gates": self.num_gates, "k": self.k,
                "gamma": self.gamma, "entropy_weight": self.entropy_weight,
                "stop_gradient_input": self.stop_gradient_input,
                "selector_initializer": keras.initializers.serialize(self.selector_initializer),
                "combination_initializer": keras.initializers.serialize(self.combination_initializer)}


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
