"""PEPNet (Chang et al., KDD 2023): Gate NU, EPNet and PPNet towers."""
from __future__ import annotations

import keras
from keras import ops

from mdmt_tf.layers._util import check_positive_int, check_units, clone_initializer, register
from mdmt_tf.layers.initializers import GroupedGlorotUniform


@register
class GateNU(keras.layers.Layer):
    """Gate neural unit: delta = scale * sigmoid(W2 relu(W1 x + b1) + b2), in (0, scale).

    With scale 2 (the paper's gamma) a neutral gate (logit 0) multiplies by exactly 1.
    """

    def __init__(self, output_dim, hidden_units=64, scale=2.0, kernel_initializer="glorot_uniform",
                 bias_initializer="zeros", **kwargs):
        super().__init__(**kwargs)
        self.output_dim = check_positive_int(output_dim, "output_dim", "GateNU")
        self.hidden_units = check_positive_int(hidden_units, "hidden_units", "GateNU")
        self.scale = float(scale)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.hidden = keras.layers.Dense(self.hidden_units, activation="relu", dtype=self.dtype_policy, name="hidden",
                                         kernel_initializer=clone_initializer(self.kernel_initializer, 0),
                                         bias_initializer=clone_initializer(self.bias_initializer, 0))
        self.out = keras.layers.Dense(self.output_dim, dtype=self.dtype_policy, name="out",
                                      kernel_initializer=clone_initializer(self.kernel_initializer, 1),
                                      bias_initializer=clone_initializer(self.bias_initializer, 1))

    def build(self, input_shape):
        self.hidden.build(input_shape)
        self.out.build(tuple(input_shape)[:-1] + (self.hidden_units,))

    def call(self, x):
        return self.scale * ops.sigmoid(self.out(self.hidden(x)))

    def get_config(self):
        return {**super().get_config(), "output_dim": self.output_dim, "hidden_units": self.hidden_units,
                "scale": self.scale, "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer)}


@register
class EPNet(keras.layers.Layer):
    """Embedding personalisation: O_ep = GateNU(E(domain) ++ stop_gradient(E)) * E.

    call(embedding [B, k], domain_embedding [B, k_d]) -> [B, k]; with return_gate=True,
    (output, delta [B, k]), delta in (0, scale) the Gate NU's per-sample scaling (reports).
    """

    def __init__(self, hidden_units=64, scale=2.0, **kwargs):
        super().__init__(**kwargs)
        self.hidden_units = check_positive_int(hidden_units, "hidden_units", "EPNet")
        self.scale = float(scale)

    def build(self, embedding_shape, domain_embedding_shape):
        k = embedding_shape[-1]
        self.gate = GateNU(k, hidden_units=self.hidden_units, scale=self.scale, dtype=self.dtype_policy, name="gate_nu")
        d = domain_embedding_shape[-1]
        self.gate.build((None, k + d))

    def call(self, embedding, domain_embedding, return_gate=False):
        delta = self.gate(ops.concatenate([domain_embedding, ops.stop_gradient(embedding)], axis=-1))
        out = delta * embedding
        return (out, delta) if return_gate else out

    def get_config(self):
        return {**super().get_config(), "hidden_units": self.hidden_units, "scale": self.scale}


@register
class PPNetTowers(keras.layers.Layer):
    """Parameter personalisation: per-task towers whose every layer input is scaled by a
    Gate NU of (prior embeddings ++ stop_gradient(O_ep)).

    call(x [B, k] (O_ep), prior [B, p]) -> logits [B, T]. Layer l of task t computes
    h_{l+1} = act((delta_t^l * h_l) W_t^l + b_t^l), delta^l = GateNU_l(prior ++ sg(x)).
    With return_gates=True, (logits, [delta^l [B, T, width_l] for each layer]), in (0, scale).
    """

    def __init__(self, num_tasks, units=(64,), gate_hidden_units=64, scale=2.0, activation="relu",
                 kernel_initializer=None, **kwargs):
        super().__init__(**kwargs)
        self.num_tasks = check_positive_int(num_tasks, "num_tasks", "PPNetTowers")
        self.units = check_units(units, "units", "PPNetTowers", allow_empty=True)
        self.gate_hidden_units = check_positive_int(gate_hidden_units, "gate_hidden_units", "PPNetTowers")
        self.scale = float(scale)
        self.activation_name = activation
        self.activation = keras.activations.get(activation)
        self.kernel_initializer = keras.initializers.get(kernel_initializer or GroupedGlorotUniform())

    def build(self, x_shape, prior_shape):
        fan_in, t = x_shape[-1], self.num_tasks
        gate_in = fan_in + prior_shape[-1]
        self.gates, self.kernels, self.biases = [], [], []
        for i, width in enumerate(self.units + (1,)):
            gate = GateNU(t * fan_in, hidden_units=self.gate_hidden_units, scale=self.scale, dtype=self.dtype_policy,
                          name=f"gate_nu_{i}")
            gate.build((None, gate_in))
            self.gates.append(gate)
            self.kernels.append(self.add_weight(name=f"kernel_{i}", shape=(t, fan_in, width),
                                                initializer=clone_initializer(self.kernel_initializer, i)))
            self.biases.append(self.add_weight(name=f"bias_{i}", shape=(t, width), initializer="zeros"))
            fan_in = width

    def call(self, x, prior, return_gates=False):
        gate_input = ops.concatenate([prior, ops.stop_gradient(x)], axis=-1)
        h = ops.broadcast_to(x[:, None, :], (ops.shape(x)[0], self.num_tasks, x.shape[-1]))
        last = len(self.kernels) - 1
        deltas = []
        for i, (gate, kernel, bias) in enumerate(zip(self.gates, self.kernels, self.biases)):
            delta = ops.reshape(gate(gate_input), (-1, self.num_tasks, kernel.shape[1]))
            deltas.append(delta)
            h = ops.einsum("bti,tio->bto", delta * h, kernel) + bias
            if i < last:
                h = self.activation(h)
        return (h[..., 0], deltas) if return_gates else h[..., 0]

    def get_config(self):
        return {**super().get_config(), "num_tasks": self.num_tasks, "units": list(self.units),
                "gate_hidden_units": self.gate_hidden_units, "scale": self.scale,
                "activation": self.activation_name,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer)}
