"""STAR (Sheng et al., CIKM 2021): partitioned normalization and the star-topology FC layer."""
from __future__ import annotations

import keras
from keras import ops

from mdmt_tf.layers._util import check_positive_int, register, select_by_domain


@register
class PartitionedNorm(keras.layers.Layer):
    """z' = (gamma * gamma_p) (z - mu) / sqrt(var + eps) + (beta + beta_p), p = the row's domain.

    Training normalises each row with its own domain's moments in the batch (batches here
    mix domains); inference uses each domain's moving moments. A domain absent from a batch
    leaves its moving moments unchanged, and no division by zero occurs.
    """

    def __init__(self, num_domains, momentum=0.99, epsilon=1e-3, **kwargs):
        super().__init__(**kwargs)
        self.num_domains = check_positive_int(num_domains, "num_domains", "PartitionedNorm")
        self.momentum, self.epsilon = float(momentum), float(epsilon)
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"PartitionedNorm: `momentum` must be in [0, 1), received momentum={momentum!r}")
        if self.epsilon <= 0.0:
            raise ValueError(f"PartitionedNorm: `epsilon` must be > 0, received epsilon={epsilon!r}")

    def build(self, input_shape):
        # statistics and affine parameters are float32 whatever the policy: the normalisation
        # is computed in float32 and only the output takes the compute dtype
        f, d = input_shape[-1], self.num_domains

        def float32(name, shape, initializer, trainable=True):
            return self.add_weight(name=name, shape=shape, initializer=initializer, trainable=trainable,
                                   autocast=False, dtype="float32")

        self.gamma = float32("gamma", (f,), "ones")
        self.beta = float32("beta", (f,), "zeros")
        self.domain_gamma = float32("domain_gamma", (d, f), "ones")
        self.domain_beta = float32("domain_beta", (d, f), "zeros")
        self.moving_mean = float32("moving_mean", (d, f), "zeros", trainable=False)
        self.moving_variance = float32("moving_variance", (d, f), "ones", trainable=False)

    def call(self, x, domain, training=None):
        dtype = x.dtype
        x32 = ops.cast(x, "float32")
        onehot = ops.one_hot(domain, self.num_domains, dtype="float32")  # [B, D]
        if training:
            count = ops.sum(onehot, axis=0)  # [D]
            denom = ops.maximum(count, 1.0)[:, None]
            mean = ops.matmul(ops.transpose(onehot), x32) / denom  # [D, F]
            centred = x32 - ops.matmul(onehot, mean)
            variance = ops.matmul(ops.transpose(onehot), ops.square(centred)) / denom
            present = (count > 0)[:, None]
            m = self.momentum
            self.moving_mean.assign(ops.where(present, m * self.moving_mean + (1 - m) * mean, self.moving_mean))
            self.moving_variance.assign(ops.where(present, m * self.moving_variance + (1 - m) * variance,
                                                  self.moving_variance))
            row_var = ops.matmul(onehot, variance)
        else:
            centred = x32 - ops.matmul(onehot, self.moving_mean)
            row_var = ops.matmul(onehot, self.moving_variance)
        normed = centred * ops.rsqrt(row_var + self.epsilon)
        scale = self.gamma * ops.matmul(onehot, self.domain_gamma)
        shift = self.beta + ops.matmul(onehot, self.domain_beta)
        return ops.cast(scale * normed + shift, dtype)

    def get_config(self):
        return {**super().get_config(), "num_domains": self.num_domains, "momentum": self.momentum,
                "epsilon": self.epsilon}


@register
class StarFC(keras.layers.Layer):
    """Star-topology fully connected layer: out = act(x (W * W_p) + b + b_p), p = the row's domain.

    W, b are shared; W_p (initialised to ones) and b_p (zeros) belong to domain p, so the
    layer starts as the shared layer and each domain learns its multiplicative deviation.
    """

    def __init__(self, num_domains, units, activation=None, kernel_initializer="glorot_uniform",
                 domain_kernel_initializer="ones", bias_initializer="zeros", **kwargs):
        super().__init__(**kwargs)
        self.num_domains = check_positive_int(num_domains, "num_domains", "StarFC")
        self.units = check_positive_int(units, "units", "StarFC")
        self.activation_name = activation
        self.activation = keras.activations.get(activation)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.domain_kernel_initializer = keras.initializers.get(domain_kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)

    def build(self, input_shape):
        fan_in, d = input_shape[-1], self.num_domains
        self.kernel = self.add_weight(name="kernel", shape=(fan_in, self.units), initializer=self.kernel_initializer)
        self.bias = self.add_weight(name="bias", shape=(self.units,), initializer=self.bias_initializer)
        self.domain_kernel = self.add_weight(name="domain_kernel", shape=(d, fan_in, self.units),
                                             initializer=self.domain_kernel_initializer)
        self.domain_bias = self.add_weight(name="domain_bias", shape=(d, self.units), initializer="zeros")

    def call(self, x, domain):
        kernels = self.kernel[None] * self.domain_kernel  # [D, in, out]
        per_domain = ops.einsum("bi,dio->bdo", x, kernels) + self.domain_bias[None]
        return self.activation(select_by_domain(per_domain, domain, self.num_domains) + self.bias)

    def get_config(self):
        return {**super().get_config(), "num_domains": self.num_domains, "units": self.units,
                "activation": self.activation_name,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "domain_kernel_initializer": keras.initializers.serialize(self.domain_kernel_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer)}
