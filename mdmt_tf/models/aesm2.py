"""AESM²: automatic expert selection for multi-scenario and multi-task search (Zou et al.,
SIGIR 2022; seed 002's "AESM²" slides).

Multi-task layers are stacked over multi-scenario layers. Every layer has n experts (MLPs)
and m gates: one per scenario (domain) in a scenario layer, one per task in a task layer.
For an input h, gate j's logits over the n experts are

    g_j = S_j [h, s] + eta_j     (task layer: T_j [h_t, s, t_t] + eta_j),  eta_j ~ N(0, sigma^2)

with s the sample's scenario embedding, t_t the task's embedding, and the noise only in
training (exploration of expert combinations). G = [g_1 .. g_m] is [m, n]; G~ = its
softmax over the m gates, so G~[:, k] is expert k's affinity to each scenario (task).
For the sample's own scenario (the task of the slot) j, with p_j the one-hot vector of j
and q the uniform vector 1/m:

    E_sp = TopK_k( -KL(p_j || G~[:, k]) )   (= the K_sp experts with the largest G~[j, k])
    E_sh = TopK_k( -KL(q   || G~[:, k]) )   (the K_sh experts closest to uniform: shared)

and the layer mixes only the selected experts with its own gate, renormalised:

    w = softmax( g_j[k] if k in E_sp u E_sh else -inf ),   z = sum_k w_k E_k(h)

(the "MMoE(h, g^_j)" of the paper). The selection is discrete, so an expert outside
E_sp u E_sh gets no gradient from the sample, and the other scenarios' (tasks') gates
only enter through the selection. The auxiliary loss pulls the selected experts' columns
towards their targets (it is what trains those other gates):

    L_aux = specific_loss_weight * sum_layers mean_rows mean_{k in E_sp} KL(p_j || G~[:, k])
          + shared_loss_weight   * sum_layers mean_rows mean_{k in E_sh} KL(q   || G~[:, k])

added in training only. Each task's output is sigmoid(MLP_t(z_t)).

Defaults. Verified in the seed's equations: the gate input [h, s] (+ t_t), Gaussian noise on
the gate logits, softmax of G over the gates, the two TopK-of-negative-KL rules against
p_j (one-hot) and q (uniform), the -inf masking of the unselected experts, the task layers
over the scenario layers, sigmoid(MLP(z_k)). Checked against the authors' public code
(reading only): the KL to the gates' distribution of each expert, a separate K for the
specific and the shared sets, the auxiliary KL terms (mean over rows and selected experts).
Where the authors' code differs from the paper we follow the paper: the noisy logits are
also the mixing logits (g^_j[k] = g_j[k]), and the masking is a true -inf (the code
multiplies logits by the mask). Our choices (not given in the seed): num_scenario_layers=1,
num_task_layers=1, 8 experts per layer, top_k_specific=2, top_k_shared=2, noise_std=0.1,
both loss weights 0.1, the widths; s is the domain field's row of the shared embedding,
t_t a learned task embedding of the same size. With a single scenario (task) every expert
has the same KL (0) and the selection falls back on the first experts.
"""
from __future__ import annotations

import dataclasses

import keras
from keras import layers, ops

from mdmt_tf.errors import ConfigError
from mdmt_tf.layers import ExpertGroup, Towers
from mdmt_tf.layers._util import check_positive_int, check_units, register
from mdmt_tf.models.base import MDMTModel
from mdmt_tf.models.details import Details, Gate
from mdmt_tf.models.params import Params

MASKED = -1e9  # the "-inf" of an unselected expert's logit (float32: exp underflows to exactly 0)


def kl_to_targets(logits, index):
    """The KL of every expert's gate distribution to the one-hot and the uniform target.

    logits [..., m, n] (m gates over n experts, float32); index [...] the own gate of each
    row. G~ = softmax over the m gates. Returns (KL(p_index || G~[:, k]), KL(q || G~[:, k])),
    each [..., n]: -log G~[index, k] and -log m - mean_j log G~[j, k].
    """
    m = logits.shape[-2]
    log_g = ops.log_softmax(logits, axis=-2)
    onehot = ops.one_hot(index, m, dtype=logits.dtype)[..., None]  # [..., m, 1]
    specific = -ops.sum(onehot * log_g, axis=-2)
    shared = -ops.log(ops.cast(m, logits.dtype)) - ops.mean(log_g, axis=-2)
    return specific, shared


def top_k_mask(kl, k: int):
    """0/1 [..., n] marking the k experts of smallest KL (ties: the lower index)."""
    if k == 0:
        return ops.zeros_like(kl)
    _, chosen = ops.top_k(-kl, k=k)  # k distinct experts: the sum of their one-hots is 0/1
    return ops.sum(ops.one_hot(chosen, kl.shape[-1], dtype=kl.dtype), axis=-2)


def select_experts(logits, index, top_k_specific: int, top_k_shared: int):
    """The expert selection rule on gate logits [..., m, n] (float32) and own gates [...].

    Returns (weights, specific, shared, kl_specific, kl_shared), each [..., n]: the mix weights
    (softmax of the own gate's logits over the selected experts, 0 elsewhere), the 0/1 masks
    of E_sp and E_sh, and the two KL values of every expert.
    """
    kl_specific, kl_shared = kl_to_targets(logits, index)
    specific = top_k_mask(ops.stop_gradient(kl_specific), top_k_specific)
    shared = top_k_mask(ops.stop_gradient(kl_shared), top_k_shared)
    selected = ops.maximum(specific, shared)
    onehot = ops.one_hot(index, logits.shape[-2], dtype=logits.dtype)[..., None]
    own = ops.sum(onehot * logits, axis=-2)  # g_j: the row's own gate
    weights = ops.softmax(ops.where(selected > 0, own, MASKED), axis=-1)
    return weights, specific, shared, kl_specific, kl_shared


@register
class ExpertSelectionLayer(keras.layers.Layer):
    """One AESM² layer: `num_experts` MLP experts, `num_gates` noisy linear gates and the
    KL expert selection (see the module doc).

    call(inputs, gate_inputs, index, training) with inputs [B, in] (every slot's experts read
    the same input) or [B, S, in] (slot s's own input), gate_inputs [B, S, c] and index [B, S]
    (int: the own gate of each slot, e.g. the domain for S = 1, or the task t for slot t) ->
    dict(outputs [B, S, H], weights [B, S, n] (float32, rows sum to 1 over the selected
    experts), specific / shared [B, S, n] (0/1 masks), specific_loss / shared_loss (float32
    scalars: the mean over rows and slots of the mean KL of the selected experts)).
    Experts are shared by the slots (MMoE), each slot mixing them with its own gate.
    """

    def __init__(self, num_experts, num_gates, expert_units, top_k_specific=2, top_k_shared=2, noise_std=0.1,
                 seed=None, **kwargs):
        super().__init__(**kwargs)
        name = "ExpertSelectionLayer"
        self.num_experts = check_positive_int(num_experts, "num_experts", name)
        self.num_gates = check_positive_int(num_gates, "num_gates", name)
        self.expert_units = check_units(expert_units, "expert_units", name)
        self.top_k_specific = check_positive_int(top_k_specific, "top_k_specific", name)
        self.top_k_shared = check_positive_int(top_k_shared, "top_k_shared", name, minimum=0)
        if max(self.top_k_specific, self.top_k_shared) > self.num_experts:
            raise ValueError(f"{name}: top_k_specific={top_k_specific} and top_k_shared={top_k_shared} must be "
                             f"<= num_experts={num_experts}")
        self.noise_std = float(noise_std)
        if self.noise_std < 0:
            raise ValueError(f"{name}: `noise_std` must be >= 0, received noise_std={noise_std!r}")
        self.seed = seed
        self._seed_generator = keras.random.SeedGenerator(seed) if self.noise_std else None
        self.experts = ExpertGroup(self.num_experts, self.expert_units, dtype=self.dtype_policy, name="experts")

    def build(self, inputs_shape, gate_inputs_shape, index_shape):
        self.experts.build((None, inputs_shape[-1]))
        m, c, n = self.num_gates, gate_inputs_shape[-1], self.num_experts
        self.gate_kernel = self.add_weight(name="gate_kernel", shape=(m, c, n), initializer="glorot_uniform")
        self.gate_bias = self.add_weight(name="gate_bias", shape=(m, n), initializer="zeros")

    def gate_logits(self, gate_inputs, training=None):
        """[B, S, c] -> every gate's logits [B, S, m, n] in float32, with the noise in training."""
        logits = ops.einsum("bsc,mcn->bsmn", gate_inputs, self.gate_kernel) + self.gate_bias
        logits = ops.cast(logits, "float32")
        if training and self.noise_std:
            logits = logits + self.noise_std * keras.random.normal(ops.shape(logits), seed=self._seed_generator)
        return logits

    def call(self, inputs, gate_inputs, index, training=None):
        weights, specific, shared, kl_specific, kl_shared = select_experts(
            self.gate_logits(gate_inputs, training=training), ops.cast(index, "int32"),
            self.top_k_specific, self.top_k_shared)
        if len(inputs.shape) == 2:  # one input for every slot: the experts run once
            experts = self.experts(inputs)  # [B, n, H]
            outputs = ops.einsum("bsn,bnh->bsh", ops.cast(weights, experts.dtype), experts)
        else:
            s = inputs.shape[1]
            experts = self.experts(ops.reshape(inputs, (-1, inputs.shape[-1])))
            experts = ops.reshape(experts, (-1, s, self.num_experts, experts.shape[-1]))
            outputs = ops.einsum("bsn,bsnh->bsh", ops.cast(weights, experts.dtype), experts)
        rows = ops.maximum(ops.cast(ops.shape(weights)[0] * ops.shape(weights)[1], "float32"), 1.0)
        specific_loss = ops.sum(specific * kl_specific) / (self.top_k_specific * rows)
        shared_loss = (ops.sum(shared * kl_shared) / (self.top_k_shared * rows) if self.top_k_shared
                       else ops.zeros((), "float32"))
        return {"outputs": outputs, "weights": weights, "specific": specific, "shared": shared,
                "specific_loss": specific_loss, "shared_loss": shared_loss}

    def get_config(self):
        return {**super().get_config(), "num_experts": self.num_experts, "num_gates": self.num_gates,
                "expert_units": list(self.expert_units), "top_k_specific": self.top_k_specific,
                "top_k_shared": self.top_k_shared, "noise_std": self.noise_std, "seed": self.seed}


@dataclasses.dataclass(frozen=True)
class AESM2Params(Params):
    """num_scenario_layers / num_task_layers: stacked multi-scenario then multi-task layers.
    num_scenario_experts / num_task_experts: experts n in each scenario / task layer.
    scenario_expert_units / task_expert_units: each expert's MLP widths in those layers.
    tower_units: each task's tower hidden widths before its logit (may be empty).
    top_k_specific / top_k_shared: K of the specific and of the shared set (each <= the
      experts of every layer; top_k_shared may be 0: specific experts only).
    noise_std: sigma of the Gaussian noise on the gate logits in training (0: none).
    specific_loss_weight / shared_loss_weight: weights of the auxiliary KL terms (0: off).
    The shared `dropout` is not used (the experts have none, as in MMoE here)."""

    num_scenario_layers: int = 1
    num_task_layers: int = 1
    num_scenario_experts: int = 8
    num_task_experts: int = 8
    scenario_expert_units: tuple[int, ...] = (256, 128)
    task_expert_units: tuple[int, ...] = (64,)
    tower_units: tuple[int, ...] = (32,)
    top_k_specific: int = 2
    top_k_shared: int = 2
    noise_std: float = 0.1
    specific_loss_weight: float = 0.1
    shared_loss_weight: float = 0.1
    MAY_BE_EMPTY = Params.MAY_BE_EMPTY | {"tower_units"}

    def validate(self, model):
        super().validate(model)
        fewest = min(self.num_scenario_experts, self.num_task_experts)
        if self.top_k_specific < 1 or self.top_k_specific > fewest:
            raise ConfigError(f"{model}: top_k_specific must be in [1, {fewest}] (the experts of the smallest "
                              f"layer: num_scenario_experts={self.num_scenario_experts}, "
                              f"num_task_experts={self.num_task_experts}), got {self.top_k_specific}")
        if self.top_k_shared < 0 or self.top_k_shared > fewest:
            raise ConfigError(f"{model}: top_k_shared must be in [0, {fewest}] (the experts of the smallest "
                              f"layer: num_scenario_experts={self.num_scenario_experts}, "
                              f"num_task_experts={self.num_task_experts}), got {self.top_k_shared}")
        for name in ("noise_std", "specific_loss_weight", "shared_loss_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{model}: {name} must be >= 0, got {getattr(self, name)}")


@register
class AESM2(MDMTModel):
    """AESM² (Zou et al., SIGIR 2022): multi-task layers over multi-scenario layers, each
    selecting its scenario-/task-specific and shared experts per sample by the KL rule (see
    the module doc).

    Details gates: "scenario_layer_<i>" [B, 1, n] and "task_layer_<i>" [B, T, n], the mix
    weights actually applied (0 for an unselected expert; rows sum to 1). extra:
    "<layer>_specific" and "<layer>_shared", the 0/1 masks of E_sp and E_sh, same shapes."""

    Params = AESM2Params
    params: AESM2Params

    def build_layers(self):
        p, s = self.params, self.schema
        self.embedding = self.make_embedding()
        self.domain_position = self.embedding.fields.index(s.domain)
        self.task_embedding = layers.Embedding(s.num_tasks, p.embedding_dim, dtype=self.dtype_policy,
                                               name="task_embedding")

        def layer(name, gates, experts, units):
            return ExpertSelectionLayer(experts, gates, units, top_k_specific=p.top_k_specific,
                                        top_k_shared=p.top_k_shared, noise_std=p.noise_std,
                                        dtype=self.dtype_policy, name=name)

        self.scenario_layers = [layer(f"scenario_layer_{i}", s.num_domains, p.num_scenario_experts,
                                      p.scenario_expert_units) for i in range(p.num_scenario_layers)]
        self.task_layers = [layer(f"task_layer_{i}", s.num_tasks, p.num_task_experts, p.task_expert_units)
                            for i in range(p.num_task_layers)]
        self.towers = Towers(s.num_tasks, p.tower_units, dtype=self.dtype_policy, name="towers")

    def forward(self, features, training=None):
        t = self.schema.num_tasks
        embedded = self.embedding(features, training=training)
        scenario = embedded[:, self.domain_position]  # s: [B, k]
        h = self.flat_inputs(embedded, features)
        batch = ops.shape(h)[0]
        domain = self.domain_index(features)[:, None]  # [B, 1]
        gates, extra, specific_loss, shared_loss = [], {}, [], []

        def record(layer, result):
            gates.append(Gate(layer.name, result["weights"]))
            extra[f"{layer.name}_specific"] = result["specific"]
            extra[f"{layer.name}_shared"] = result["shared"]
            specific_loss.append(result["specific_loss"])
            shared_loss.append(result["shared_loss"])
            return result["outputs"]

        for layer in self.scenario_layers:
            gate_inputs = ops.concatenate([h, ops.cast(scenario, h.dtype)], axis=-1)[:, None]
            h = record(layer, layer(h, gate_inputs, domain, training=training))[:, 0]  # [B, H]
        tasks = ops.broadcast_to(ops.arange(t, dtype="int32")[None], (batch, t))  # [B, T]
        task_rows = ops.broadcast_to(self.task_embedding(ops.arange(t, dtype="int32"))[None],
                                     (batch, t, self.params.embedding_dim))
        scenario_rows = ops.broadcast_to(scenario[:, None], (batch, t, scenario.shape[-1]))
        for layer in self.task_layers:
            per_task = h if len(h.shape) == 3 else ops.broadcast_to(h[:, None], (batch, t, h.shape[-1]))
            gate_inputs = ops.concatenate([per_task, ops.cast(scenario_rows, h.dtype),
                                           ops.cast(task_rows, h.dtype)], axis=-1)
            h = record(layer, layer(h, gate_inputs, tasks, training=training))  # [B, T, H]
        logits = self.towers(h)
        p = self.params
        if training and (p.specific_loss_weight or p.shared_loss_weight):
            self.add_loss(p.specific_loss_weight * ops.sum(ops.stack(specific_loss))
                          + p.shared_loss_weight * ops.sum(ops.stack(shared_loss)))
        return self.probabilities(logits), Details(logits, gates=tuple(gates), extra=extra)
