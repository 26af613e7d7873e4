"""M2M: multi-scenario multi-task meta learning (Zhang et al., "Leaving No One Behind: A
Multi-Scenario Multi-Task Meta Learning Approach for Advertiser Modeling", WSDM 2022; seed
002's "M2M": meta unit, meta attention module, meta tower module).

The scenario (domain) representation S~ conditions the network by *generating* the weights
of its layers. Per sample (b), for a group g (the task) of a meta layer:

    S~_b = f_MLP(e(domain_b))                                   scenario representation
    W_g(S~) = K_g + sum_k S~_k V_{k,g}   [in, out]               W = reshape(Dense(S~))
    b_g(S~) = c_g + sum_k S~_k U_{k,g}   [out]
    MetaDense(h) = act(h W_g(S~_b) + b_g(S~_b))                  a per-sample matmul

(the Dense's own bias K, c is the scenario-independent part of the weights). A meta unit
Meta(h) is K such layers (`num_meta_unit_layers`). Then, with E_i = expert i's output over
the flattened embeddings and T_t = f_MLP(task embedding t):

    a_{t,i} = v_t^T Meta_t([E_i || T_t]),  alpha_{t,i} = softmax_i(a_{t,i}),
    R_t = sum_i alpha_{t,i} E_i                                  meta attention
    L_t^(0) = R_t,  L_t^(j) = act(Meta_t^(j)(L_t^(j-1)) + L_t^(j-1)),  j = 1..L
    logit_t = w_t^T L_t^(L) + c_t                                meta tower with residual

What is the paper's and what is ours:
- the equations above are seed 002's (S~ = f_MLP(S, A), the expert views E_i = f_MLP(F),
  the attention, the tower with the activation applied after the residual sum) and the paper's
  meta unit (weights and biases reshaped from a linear map of S~).
- the paper's backbone is a transformer over advertiser behaviour sequences, and S~ reads
  scenario-specific features besides; we have no sequences: the experts are an ExpertGroup of
  MLPs over the flattened embeddings (the domain is not one of their fields), and S~ is an
  MLP (`scenario_units`, last layer linear; [] = the raw embedding) over the domain id's own
  embedding. S~ therefore depends on the domain only, so the weights are generated once per
  domain and each sample takes its own domain's (MetaDense's `index`), which is the same
  function as generating them per sample at 1 / batch of the cost.
- in the tower's meta units the last layer is linear (the activation comes after the residual
  sum, as the seed writes it); in the attention's all K layers are activated (v^T act(.), as
  additive attention). The task views are batch-independent; the scenario reaches the
  attention through Meta_t's generated weights.
- defaults (our choice, the seed gives no widths): 4 experts of (256, 64), S~ of width 32,
  K = 2 layers per meta unit, L = 2 tower layers, relu; every meta layer is as wide as the
  expert output d (the tower's residual needs it), the task views too.
- initialisation (ours): K is Glorot-uniform, c zero, V and U uniform with variance
  1 / (width(S~) * in), so the generated part of W has variance mean(S~^2) / in against the
  static part's ~1 / in.

Details: Gate("meta_attention", alpha [B, T, E]) (softmax over the experts per task).
"""
from __future__ import annotations

import dataclasses
import math

import keras
from keras import layers, ops

from mdmt_tf.errors import ConfigError
from mdmt_tf.layers import MLP, ExpertGroup, Towers, mix
from mdmt_tf.layers._util import check_positive_int, check_units, register
from mdmt_tf.layers.initializers import GroupedGlorotUniform
from mdmt_tf.models.base import MDMTModel
from mdmt_tf.models.details import Details, Gate
from mdmt_tf.models.params import Params

ACTIVATIONS = ("relu", "leaky_relu")


# --------------------------------------------------------------------------- layers
@register
class MetaDense(keras.layers.Layer):
    """`num_groups` dense layers (one per task) whose kernel and bias are generated from a
    condition vector s (M2M's meta layer):

        W_g(s) = kernel_g + sum_k s_k kernel_generator[k, g]    [in, units]
        b_g(s) = bias_g + sum_k s_k bias_generator[k, g]        [units]
        y = activation(x W_g(s) + b_g(s))

    call(x, condition, index=None): x [B, G, in] or [B, G, N, in] (N rows per group read the
    same weights, e.g. experts); condition [B, S], one s per sample, or [M, S] with index [B]
    (int) naming each sample's row, so that M weight sets are generated instead of B (M2M's
    s depends on the domain only: M = the number of domains). Output [B, G, (N,) units].
    """

    def __init__(self, units, num_groups=1, activation=None, **kwargs):
        super().__init__(**kwargs)
        self.units = check_positive_int(units, "units", "MetaDense")
        self.num_groups = check_positive_int(num_groups, "num_groups", "MetaDense")
        self.activation_name = activation
        self.activation = keras.activations.get(activation)

    def build(self, x_shape, condition_shape, index_shape=None):
        x_shape, condition_shape = tuple(x_shape), tuple(condition_shape)
        if len(x_shape) not in (3, 4) or x_shape[1] != self.num_groups:
            raise ValueError(f"MetaDense: x must be [batch, num_groups={self.num_groups}, (rows,) features], "
                             f"received shape {x_shape}")
        if len(condition_shape) != 2:
            raise ValueError(f"MetaDense: condition must be [rows, features], received shape {condition_shape}")
        fan_in, s, g = x_shape[-1], condition_shape[-1], self.num_groups
        limit = math.sqrt(3.0 / (s * fan_in))  # Var = 1 / (s * in): see the module doc
        self.kernel = self.add_weight(name="kernel", shape=(g, fan_in, self.units), initializer=GroupedGlorotUniform())
        self.bias = self.add_weight(name="bias", shape=(g, self.units), initializer="zeros")
        self.kernel_generator = self.add_weight(name="kernel_generator", shape=(s, g, fan_in, self.units),
                                                initializer=keras.initializers.RandomUniform(-limit, limit))
        self.bias_generator = self.add_weight(name="bias_generator", shape=(s, g, self.units),
                                              initializer=keras.initializers.RandomUniform(-limit, limit))

    def generate(self, condition):
        """(kernels [M, G, in, units], biases [M, G, units]) for the M rows of condition [M, S]."""
        s = ops.cast(condition, self.compute_dtype)
        width, (g, fan_in, units) = s.shape[-1], self.kernel.shape
        kernels = ops.matmul(s, ops.reshape(self.kernel_generator, (width, g * fan_in * units)))
        biases = ops.matmul(s, ops.reshape(self.bias_generator, (width, g * units)))
        return (ops.reshape(kernels, (-1, g, fan_in, units)) + self.kernel,
                ops.reshape(biases, (-1, g, units)) + self.bias)

    def call(self, x, condition, index=None):
        kernels, biases = self.generate(condition)
        if index is not None:
            index = ops.cast(index, "int32")
            kernels, biases = ops.take(kernels, index, axis=0), ops.take(biases, index, axis=0)
        if len(x.shape) == 3:
            y = ops.einsum("bgi,bgio->bgo", x, kernels) + biases
        else:
            y = ops.einsum("bgni,bgio->bgno", x, kernels) + biases[:, :, None]
        return self.activation(y)

    def get_config(self):
        return {**super().get_config(), "units": self.units, "num_groups": self.num_groups,
                "activation": self.activation_name}


@register
class MetaAttention(keras.layers.Layer):
    """M2M's meta attention: per task t, scores a_{t,i} = v_t^T Meta_t([E_i || T_t]) with a
    meta unit Meta_t of len(units) activated MetaDense layers, alpha_t = softmax over the
    experts, R_t = sum_i alpha_{t,i} E_i.

    call(experts [B, E, d], task_views [T, d_t], condition, index=None) ->
    (R [B, T, d], alpha [B, T, E] float32).
    """

    def __init__(self, num_tasks, units, activation="relu", **kwargs):
        super().__init__(**kwargs)
        self.num_tasks = check_positive_int(num_tasks, "num_tasks", "MetaAttention")
        self.units = check_units(units, "units", "MetaAttention")
        self.activation_name = activation
        self.meta = [MetaDense(u, num_groups=self.num_tasks, activation=activation, dtype=self.dtype_policy,
                               name=f"meta_{i}") for i, u in enumerate(self.units)]

    def build(self, experts_shape, task_views_shape, condition_shape, index_shape=None):
        experts_shape, task_views_shape = tuple(experts_shape), tuple(task_views_shape)
        if len(task_views_shape) != 2 or task_views_shape[0] != self.num_tasks:
            raise ValueError(f"MetaAttention: task_views must be [num_tasks={self.num_tasks}, features], "
                             f"received shape {task_views_shape}")
        shape = (experts_shape[0], self.num_tasks, experts_shape[1], experts_shape[2] + task_views_shape[1])
        for layer in self.meta:
            layer.build(shape, condition_shape, index_shape)
            shape = shape[:-1] + (layer.units,)
        limit = math.sqrt(6.0 / (self.units[-1] + 1))  # Glorot for each task's [units, 1] vector
        self.v = self.add_weight(name="v", shape=(self.num_tasks, self.units[-1]),
                                 initializer=keras.initializers.RandomUniform(-limit, limit))

    def call(self, experts, task_views, condition, index=None):
        batch, (_, e, d), t = ops.shape(experts)[0], experts.shape, self.num_tasks
        views = ops.cast(task_views, experts.dtype)
        h = ops.concatenate([ops.broadcast_to(experts[:, None], (batch, t, e, d)),
                             ops.broadcast_to(views[None, :, None, :], (batch, t, e, views.shape[-1]))], axis=-1)
        for layer in self.meta:
            h = layer(h, condition, index)
        scores = ops.einsum("bteh,th->bte", h, ops.cast(self.v, h.dtype))
        alpha = ops.softmax(ops.cast(scores, "float32"), axis=-1)
        return mix(alpha, experts), alpha

    def get_config(self):
        return {**super().get_config(), "num_tasks": self.num_tasks, "units": list(self.units),
                "activation": self.activation_name}


@register
class MetaTower(keras.layers.Layer):
    """M2M's meta tower: per task t, L^(0) = x_t and
    L^(j) = act(Meta_t^(j)(L^(j-1)) + L^(j-1)) for j = 1..num_layers, each Meta^(j) a meta
    unit of `unit_layers` MetaDense layers of the input's width (the last one linear), then
    one logit per task (a linear head). call(x [B, T, width], condition, index=None,
    training=None) -> logits [B, T]."""

    def __init__(self, num_tasks, width, num_layers=2, unit_layers=2, activation="relu", dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        self.num_tasks = check_positive_int(num_tasks, "num_tasks", "MetaTower")
        self.width = check_positive_int(width, "width", "MetaTower")
        self.num_layers = check_positive_int(num_layers, "num_layers", "MetaTower")
        self.unit_layers = check_positive_int(unit_layers, "unit_layers", "MetaTower")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"MetaTower: `dropout` must be in [0, 1), received dropout={dropout!r}")
        self.dropout_rate = float(dropout)
        self.activation_name = activation
        self.activation = keras.activations.get(activation)
        # one flat list (Keras tracks a list of layers, not a list of lists): block j is
        # meta[j * unit_layers: (j + 1) * unit_layers]
        self.meta = [MetaDense(self.width, num_groups=self.num_tasks,
                               activation=activation if k < self.unit_layers - 1 else None,
                               dtype=self.dtype_policy, name=f"meta_{j}_{k}")
                     for j in range(self.num_layers) for k in range(self.unit_layers)]
        self.dropout = layers.Dropout(self.dropout_rate, dtype=self.dtype_policy) if self.dropout_rate else None
        self.head = Towers(self.num_tasks, units=(), dtype=self.dtype_policy, name="head")

    def build(self, x_shape, condition_shape, index_shape=None):
        x_shape = tuple(x_shape)
        if len(x_shape) != 3 or x_shape[1:] != (self.num_tasks, self.width):
            raise ValueError(f"MetaTower: x must be [batch, num_tasks={self.num_tasks}, width={self.width}] "
                             f"(the residual keeps the width), received shape {x_shape}")
        for layer in self.meta:
            layer.build(x_shape, condition_shape, index_shape)
        self.head.build(x_shape)

    def block(self, j):
        """The meta unit of residual block j: its MetaDense layers."""
        return self.meta[j * self.unit_layers:(j + 1) * self.unit_layers]

    def residual_block(self, j, h, condition, index=None):
        """L^(j) from h = L^(j-1) (no dropout)."""
        out = h
        for layer in self.block(j):
            out = layer(out, condition, index)
        return self.activation(out + h)

    def call(self, x, condition, index=None, training=None):
        h = x
        for j in range(self.num_layers):
            h = self.residual_block(j, h, condition, index)
            if self.dropout is not None:
                h = self.dropout(h, training=training)
        return self.head(h)

    def get_config(self):
        return {**super().get_config(), "num_tasks": self.num_tasks, "width": self.width,
                "num_layers": self.num_layers, "unit_layers": self.unit_layers,
                "activation": self.activation_name, "dropout": self.dropout_rate}


# ---------------------------------------------------------------------------- model
@dataclasses.dataclass(frozen=True)
class M2MParams(Params):
    """num_experts: shared experts the meta attention weighs (>= 2).
    expert_units: each expert's layers; the last, d, is also the width of the task views, the
      meta layers and the meta tower.
    scenario_units: the MLP from the domain embedding to the scenario representation S~
      (last layer linear); [] = S~ is the domain embedding itself.
    num_meta_unit_layers: K, the meta layers of every meta unit (attention and tower).
    num_tower_layers: L, the meta tower's residual blocks.
    activation: of the experts, meta layers and residual blocks.
    dropout: after every residual block of the meta tower (training only)."""

    num_experts: int = 4
    expert_units: tuple[int, ...] = (256, 64)
    scenario_units: tuple[int, ...] = (32,)
    num_meta_unit_layers: int = 2
    num_tower_layers: int = 2
    activation: str = "relu"

    MAY_BE_EMPTY = Params.MAY_BE_EMPTY | {"scenario_units"}
    CHOICES = {"activation": ACTIVATIONS}

    def validate(self, model):
        super().validate(model)
        if self.num_experts < 2:
            raise ConfigError(f"{model}: M2M's meta attention weighs experts: num_experts must be >= 2, "
                              f"got {self.num_experts}")


@register
class M2M(MDMTModel):
    """M2M (Zhang et al., WSDM 2022): scenario-generated weights in a meta attention over
    shared experts and a residual meta tower per task (see the module doc)."""

    Params = M2MParams
    params: M2MParams

    def build_layers(self):
        p, s = self.params, self.schema
        t, d = s.num_tasks, p.expert_units[-1]
        self.embedding = self.make_embedding(with_domain=False)
        self.domain_embedding = layers.Embedding(s.num_domains, p.embedding_dim, dtype=self.dtype_policy,
                                                 name="domain_embedding")
        self.scenario = (MLP(p.scenario_units, activation=p.activation, activate_last=False,
                             dtype=self.dtype_policy, name="scenario") if p.scenario_units else None)
        self.experts = ExpertGroup(p.num_experts, p.expert_units, activation=p.activation, dtype=self.dtype_policy,
                                   name="experts")
        self.task_embedding = layers.Embedding(t, d, dtype=self.dtype_policy, name="task_embedding")
        self.task_view = MLP((d,), activation=p.activation, dtype=self.dtype_policy, name="task_view")
        self.attention = MetaAttention(t, (d,) * p.num_meta_unit_layers, activation=p.activation,
                                       dtype=self.dtype_policy, name="meta_attention")
        self.tower = MetaTower(t, d, num_layers=p.num_tower_layers, unit_layers=p.num_meta_unit_layers,
                               activation=p.activation, dropout=p.dropout, dtype=self.dtype_policy,
                               name="meta_tower")

    def scenario_table(self):
        """S~ of every domain: [num_domains, width]."""
        table = self.domain_embedding(ops.arange(self.schema.num_domains, dtype="int32"))
        return table if self.scenario is None else self.scenario(table)

    def task_views(self):
        """T_t of every task: [num_tasks, d]."""
        return self.task_view(self.task_embedding(ops.arange(self.schema.num_tasks, dtype="int32")))

    def forward(self, features, training=None):
        x = self.flat_inputs(self.embedding(features, training=training), features)
        domain, scenarios = self.domain_index(features), self.scenario_table()
        represented, alpha = self.attention(self.experts(x), self.task_views(), scenarios, domain)
        logits = self.tower(represented, scenarios, domain, training=training)
        return self.probabilities(logits), Details(logits, gates=(Gate("meta_attention", alpha),))
