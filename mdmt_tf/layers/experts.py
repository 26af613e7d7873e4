"""ExpertGroup: E experts (MLPs) evaluated as one stacked einsum per layer."""
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
)
from mdmt_tf.layers.initializers import GroupedGlorotUniform


def _per_expert(x, kernel):
    """[B, E, in] x [E, in, out] -> [B, E, out] as one batched matmul over experts."""
    return ops.transpose(ops.matmul(ops.transpose(x, (1, 0, 2)), kernel), (1, 0, 2))


@register
class ExpertGroup(keras.layers.Layer):
    """A group of `num_experts` MLP experts with identical shapes and separate weights.

    Input: [B, in] (every expert reads the same input) or [B, E, in] (expert e reads
    slice e, e.g. task experts on their own task's embeddings). Output: [B, E, units[-1]].
    Each layer of all experts is a single einsum with a stacked kernel [E, in, out],
    which is much faster than E separate Dense layers.

    Args:
      units: widths of each expert's layers, e.g. (256, 64).
      norm: None, or "layer": every layer is Dense -> LayerNorm -> activation, each expert
        with its own LayerNorm scale and offset (M3oE's experts; MMoE, PLE and STEM have none).
      epsilon: the LayerNorm's variance epsilon.
    """

    def __init__(self, num_experts, units, activation="relu", kernel_initializer=None,
                 bias_initializer="zeros", norm=None, epsilon=1e-3, **kwargs):
        super().__init__(**kwargs)
        self.num_experts = check_positive_int(num_experts, "num_experts", "ExpertGroup")
        self.units = check_units(units, "units", "ExpertGroup")
        self.norm = check_norm(norm, "ExpertGroup")
        self.epsilon = float(epsilon)
        self.activation_name = activation
        self.activation = keras.activations.get(activation)
        self.kernel_initializer = keras.initializers.get(kernel_initializer or GroupedGlorotUniform())
        self.bias_initializer = keras.initializers.get(bias_initializer)

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) == 3 and input_shape[1] != self.num_experts:
            raise ValueError(f"ExpertGroup: a rank-3 input must be [batch, num_experts={self.num_experts}, "
                             f"features], received shape {input_shape}")
        fan_in = input_shape[-1]
        self.kernels, self.biases, self.gammas, self.betas = [], [], [], []
        for i, width in enumerate(self.units):
            shape = (self.num_experts, width)
            self.kernels.append(self.add_weight(name=f"kernel_{i}", shape=(self.num_experts, fan_in, width),
                                                initializer=clone_initializer(self.kernel_initializer, i)))
            self.biases.append(self.add_weight(name=f"bias_{i}", shape=shape,
                                               initializer=clone_initializer(self.bias_initializer, i)))
            if self.norm == "layer":
                self.gammas.append(self.add_weight(name=f"norm_gamma_{i}", shape=shape, initializer="ones"))
                self.betas.append(self.add_weight(name=f"norm_beta_{i}", shape=shape, initializer="zeros"))
            fan_in = width

    def _finish(self, h, i):
        """Layer i's pre-activation [B, E, out] -> (LayerNorm) -> activation."""
        if self.norm == "layer":
            h = grouped_layer_norm(h, self.gammas[i], self.betas[i], self.epsilon)
        return self.activation(h)

    def call(self, x):
        e = self.num_experts
        if len(x.shape) == 2:
            # shared input: one wide GEMM [B, in] x [in, E*out] (faster than a broadcast einsum);
            # a flat bias keeps it a bias add, which TF fuses into the GEMM with the activation
            kernel = self.kernels[0]
            width = kernel.shape[2]
            wide = ops.reshape(ops.transpose(kernel, (1, 0, 2)), (kernel.shape[1], e * width))
            h = ops.matmul(x, wide) + ops.reshape(self.biases[0], (e * width,))
            if self.norm is None:
                h = ops.reshape(self.activation(h), (-1, e, width))
            else:
                h = self._finish(ops.reshape(h, (-1, e, width)), 0)
        else:
            h = self._finish(_per_expert(x, self.kernels[0]) + self.biases[0], 0)
        for i, (kernel, bias) in enumerate(zip(self.kernels[1:], self.biases[1:]), start=1):
            h = self._finish(_per_expert(h, kernel) + bias, i)
        return h

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_experts, self.units[-1])

    def get_config(self):
        return {**super().get_config(), "num_experts": self.num_experts, "units": list(self.units),
                "activation": self.activation_name, "norm": self.norm, "epsilon": self.epsilon,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer)}
