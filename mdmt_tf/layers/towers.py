"""Towers: one MLP head per task, or per (domain, task) with each sample using its own domain's."""
from __future__ import annotations

import keras
from keras import ops

from mdmt_tf.layers._util import (
    check_norm,
    check_positive_int,
    check_units,
    clone_initializer,
    grouped_layer_norm,
    register,
    select_by_domain,
)
from mdmt_tf.layers.initializers import GroupedGlorotUniform


@register
class Towers(keras.layers.Layer):
    """Per-task (and optionally per-domain) towers: hidden layers then one logit.

    Input: [B, T, H] (task t's tower reads slice t) or [B, H] (all read the same).
    With num_domains > 1, pass `domain` [B]: every sample is scored by its own domain's
    tower for each task, and the other domains' towers get zero gradient from it.
    Output: logits [B, T]. Stacked kernels make all towers one einsum per layer.

    Args:
      units: hidden widths, e.g. (64,) for a 64 -> 64 -> 1 tower on a 64-wide input;
        () for a linear head.
      norm: None, or "layer": each hidden layer is Dense -> LayerNorm -> activation, each
        tower with its own LayerNorm scale and offset (M3oE's towers).
      epsilon: the LayerNorm's variance epsilon.
    """

    def __init__(self, num_tasks, units=(64,), num_domains=1, activation="relu",
                 kernel_initializer=None, bias_initializer="zeros", norm=None, epsilon=1e-3, **kwargs):
        super().__init__(**kwargs)
        self.num_tasks = check_positive_int(num_tasks, "num_tasks", "Towers")
        self.num_domains = check_positive_int(num_domains, "num_domains", "Towers")
        self.units = check_units(units, "units", "Towers", allow_empty=True)
        self.norm = check_norm(norm, "Towers")
        self.epsilon = float(epsilon)
        self.activation_name = activation
        self.activation = keras.activations.get(activation)
        self.kernel_initializer = keras.initializers.get(kernel_initializer or GroupedGlorotUniform())
        self.bias_initializer = keras.initializers.get(bias_initializer)

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) == 3 and input_shape[1] != self.num_tasks:
            raise ValueError(f"Towers: a rank-3 input must be [batch, num_tasks={self.num_tasks}, features], "
                             f"received shape {input_shape}")
        fan_in = input_shape[-1]
        lead = (self.num_domains, self.num_tasks)
        self.kernels, self.biases, self.gammas, self.betas = [], [], [], []
        for i, width in enumerate(self.units + (1,)):
            self.kernels.append(self.add_weight(name=f"kernel_{i}", shape=lead + (fan_in, width),
                                                initializer=clone_initializer(self.kernel_initializer, i)))
            self.biases.append(self.add_weight(name=f"bias_{i}", shape=lead + (width,),
                                               initializer=clone_initializer(self.bias_initializer, i)))
            if self.norm == "layer" and i < len(self.units):  # hidden layers only, not the logit
                self.gammas.append(self.add_weight(name=f"norm_gamma_{i}", shape=lead + (width,), initializer="ones"))
                self.betas.append(self.add_weight(name=f"norm_beta_{i}", shape=lead + (width,), initializer="zeros"))
            fan_in = width

    def call(self, x, domain=None):
        if self.num_domains > 1 and domain is None:
            raise ValueError("Towers: per-domain towers need the `domain` index of each sample")
        x = x if len(x.shape) == 3 else ops.broadcast_to(x[:, None, :], (ops.shape(x)[0], self.num_tasks, x.shape[-1]))
        equation = "bti,dtio->bdto"
        last = len(self.kernels) - 1
        for i, (kernel, bias) in enumerate(zip(self.kernels, self.biases)):
            x = ops.einsum(equation, x, kernel) + bias
            if i < last:
                if self.norm == "layer":
                    x = grouped_layer_norm(x, self.gammas[i], self.betas[i], self.epsilon)
                x = self.activation(x)
            equation = "bdti,dtio->bdto"
        logits = x[..., 0]  # [B, D, T]
        if self.num_domains == 1:
            return logits[:, 0, :]
        return select_by_domain(logits, domain, self.num_domains)

    def get_config(self):
        return {**super().get_config(), "num_tasks": self.num_tasks, "units": list(self.units),
                "num_domains": self.num_domains, "activation": self.activation_name, "norm": self.norm,
                "epsilon": self.epsilon,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer)}
