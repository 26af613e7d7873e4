"""M3oE: multi-domain multi-task mixture of experts (Zhang et al., SIGIR 2024).

The network is the authors' released model (checked against their code; the parity test
tests/models/test_m3oe_parity.py restates its forward in NumPy):

    embeddings (domain indicator + sparse fields, 16 each; dense values) -> x
    bottom:  StarFC(x) -> 512: x (W_d * W) + b_d + b for the row's domain d, W_d and W both
             Xavier-initialised, no norm, no activation; then Dense 512 -> 256, LayerNorm,
             ReLU; plus a learned skip Dense x -> 256, LayerNorm, ReLU; the two summed
    experts: n_shared shared experts, one domain expert per domain, one task expert per
             task; each Dense bottom 256 -> 64, LayerNorm, ReLU (the authors' code has one
             layer per expert: `fcn_dims = [512, 256, 256, 64]`, whose last two entries are
             the experts' input and output). All experts reading the bottom are one stacked
             ExpertGroup `experts` (shared, then domain, then task experts: one GEMM per
             layer); `expert_slices` says which is which
    shared view [d, t]: softmax gate of tower (d, t), Dense 256 -> n_shared, over the shared
             experts, reading stop_gradient(bottom) as the authors do (gate_stop_gradient)
    level 1 (balance beta): domain view d = s(b_d) E_d + (1 - s(b_d)) / (D - 1) sum_{j!=d} E_j;
             task view t likewise over the task experts
    level 2 (amplitude alpha): fused[d, t] = shared[d, t] + s(a_d) domain[d] + s(a_t) task[t]
    towers:  one per (domain, task): Dense 64 -> 64, LayerNorm, ReLU, Dense 64 -> 1; a sample
             is scored by its own domain's towers

LayerNorms use epsilon 1e-5 (torch's default, as in the authors' code). alpha, beta (and the
gate logits with shared_gate="logits") are architecture variables; their raw values start
at 1.0 as in the released configuration.

Ours, not the authors': arch_granularity="vector" (an alpha / beta per domain and per task),
shared_gate="logits" (input-independent gates searched like DARTS' mixing weights), and
gating="aftb" (the m3oe_aftb model): task experts read task-specific embeddings (bottom-deep:
n_in -> 256 -> 64 with LayerNorm) and the gate of tower (d, t) mixes ALL experts (shared, domain,
task) forward, with stop_gradient on the other tasks' experts there and in the task view
(STEM's All-Forward-Task-specific-Backward), so task t's loss never trains another task's
experts or embeddings. aftb_domains=True also stops gradients into other domains' experts
(domain x task AFTB; no published system has it).

shared_gate="dselect_k" (ours): the shared gates (or, with gating="aftb", the per-task gates
over all experts) are DSelect-k gates (Hazimeh et al., NeurIPS 2021; layers.DSelectKGate),
each mixing at most `dselect_k` experts, smooth-step width `dselect_gamma`, entropy
regulariser weight `dselect_entropy` -- the same parameters as MMoE's and PLE's
gating="dselect_k". It is spelled `shared_gate` here, not `gating`, because M3oE's `gating`
already chooses which experts a gate mixes and where gradients flow ("softmax": the shared
experts; "aftb": all experts with STEM's task-specific backward), while `shared_gate` chooses
how the gate weights are computed ("network": softmax of Dense(bottom); "logits": searched
architecture variables; "dselect_k"): the two are independent, so DSelect-k combines with
either gating.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from keras import ops

from mdmt_tf.errors import ConfigError
from mdmt_tf.layers import (
    MLP,
    Amplitude,
    Balance,
    DSelectKGate,
    ExpertGroup,
    GateLogits,
    GroupedGlorotUniform,
    SoftmaxGate,
    StarFC,
    Towers,
    aftb_mix,
    mix,
)
from mdmt_tf.layers._util import register, select_by_domain
from mdmt_tf.models.base import MDMTModel
from mdmt_tf.models.baselines import DSELECT_ENTROPY, DSELECT_GAMMA, DSELECT_K, check_dselect
from mdmt_tf.models.details import Details, Gate
from mdmt_tf.models.params import Params


@dataclasses.dataclass(frozen=True)
class M3oEParams(Params):
    """Defaults follow the authors' released configuration."""

    bottom_units: tuple[int, ...] = (512, 256)  # STAR layer x -> 512, then 512 -> 256; the skip x -> 256
    expert_units: tuple[int, ...] = (64,)       # each expert: bottom 256 -> 64
    tower_units: tuple[int, ...] = (64,)        # 64 -> 64 -> 1
    num_shared_experts: int = 4
    arch_init: float = 1.0                      # raw alpha / beta; sigmoid(1) = 0.73
    arch_granularity: str = "scalar"            # "scalar" (authors) or "vector" (per domain / task)
    gate_stop_gradient: bool = True             # shared gates read stop_gradient(bottom)
    shared_gate: str = "network"                # "network" (softmax of Dense(bottom)), "logits" (arch vars)
                                                # or "dselect_k" (DSelect-k gates on the bottom)
    gating: str = "softmax"                     # "softmax" or "aftb"
    aftb_domains: bool = False                  # with aftb: also stop gradients into other domains' experts
    task_embedding_fields: tuple[str, ...] = ()  # with aftb: fields with task-specific tables; () = all sparse
    dselect_k: int = DSELECT_K                  # with shared_gate="dselect_k": experts each gate mixes at most
    dselect_gamma: float = DSELECT_GAMMA        # smooth-step width
    dselect_entropy: float = DSELECT_ENTROPY    # entropy regulariser weight (training passes)

    CHOICES = {"arch_granularity": ("scalar", "vector"), "shared_gate": ("network", "logits", "dselect_k"),
               "gating": ("softmax", "aftb")}
    MAY_BE_EMPTY = Params.MAY_BE_EMPTY | {"tower_units", "task_embedding_fields"}

    def validate(self, model):
        super().validate(model)
        if len(self.bottom_units) < 2:
            raise ConfigError(f"{model}: bottom_units needs at least 2 widths (the STAR layer's, then the bottom "
                              f"MLP's), e.g. [512, 256]; got {list(self.bottom_units)}")
        if self.aftb_domains and self.gating != "aftb":
            raise ConfigError(f"{model}: aftb_domains=true needs gating='aftb', got gating={self.gating!r}")
        # with aftb the gates mix num_shared_experts + domains + tasks experts: checked at build
        on_shared = self.shared_gate == "dselect_k" and self.gating != "aftb"
        check_dselect(model, self.dselect_k, self.dselect_gamma, self.dselect_entropy,
                      {"a shared gate (num_shared_experts)": self.num_shared_experts} if on_shared else None)


LAYER_NORM_EPSILON = 1e-5  # torch.nn.LayerNorm's default, which the authors' code uses


@register
class M3oE(MDMTModel):
    Params = M3oEParams
    params: M3oEParams

    def build_layers(self):
        s, p = self.schema, self.params
        d, t = s.num_domains, s.num_tasks
        self.aftb = p.gating == "aftb"
        self.embedding = self.make_embedding()
        eps = LAYER_NORM_EPSILON
        self.star = StarFC(d, p.bottom_units[0], kernel_initializer=GroupedGlorotUniform(),
                           domain_kernel_initializer=GroupedGlorotUniform(), dtype=self.dtype_policy,
                           name="star_bottom")
        self.bottom = MLP(p.bottom_units[1:], norm="layer", epsilon=eps, dropout=p.dropout, dtype=self.dtype_policy,
                          name="bottom")
        self.skip = MLP(p.bottom_units[-1:], norm="layer", epsilon=eps, dropout=p.dropout, dtype=self.dtype_policy,
                        name="skip")
        n_s = p.num_shared_experts
        on_bottom = n_s + d + (0 if self.aftb else t)
        self.experts = ExpertGroup(on_bottom, p.expert_units, norm="layer", epsilon=eps, dtype=self.dtype_policy,
                                   name="experts")
        self.expert_slices = {"shared": slice(0, n_s), "domain": slice(n_s, n_s + d)}
        if self.aftb:  # on task embeddings: as deep as bottom + expert
            self.task_experts = ExpertGroup(t, p.bottom_units[-1:] + p.expert_units, norm="layer", epsilon=eps,
                                            dtype=self.dtype_policy, name="task_experts")
        else:
            self.expert_slices["task"] = slice(n_s + d, n_s + d + t)
        self.expert_cuts = [part.stop for part in self.expert_slices.values()][:-1]  # where to split
        self.gates: Any  # one Softmax / DSelectK gate over the shared experts, per-task AFTB gates, or GateLogits
        if self.aftb:
            self.make_task_embeddings(p.task_embedding_fields)
            num_experts = p.num_shared_experts + d + t
            if p.shared_gate == "network":
                self.gates = [SoftmaxGate(num_experts, num_gates=d, dtype=self.dtype_policy,
                                          name=f"aftb_gate_{i}") for i in range(t)]
            elif p.shared_gate == "dselect_k":
                check_dselect(self.name, p.dselect_k, p.dselect_gamma, p.dselect_entropy,
                              {"an AFTB gate (shared + domain + task experts)": num_experts})
                self.gates = [DSelectKGate(num_experts, num_gates=d, k=p.dselect_k, gamma=p.dselect_gamma,
                                           entropy_weight=p.dselect_entropy, dtype=self.dtype_policy,
                                           name=f"aftb_gate_{i}") for i in range(t)]
            else:
                self.gates = GateLogits(num_experts, num_gates=d * t, dtype=self.dtype_policy, name="aftb_gate_logits")
        elif p.shared_gate == "network":
            self.gates = SoftmaxGate(p.num_shared_experts, num_gates=d * t, stop_gradient_input=p.gate_stop_gradient,
                                     dtype=self.dtype_policy, name="shared_gates")
        elif p.shared_gate == "dselect_k":
            self.gates = DSelectKGate(p.num_shared_experts, num_gates=d * t, k=p.dselect_k, gamma=p.dselect_gamma,
                                      entropy_weight=p.dselect_entropy, stop_gradient_input=p.gate_stop_gradient,
                                      dtype=self.dtype_policy, name="shared_gates")
        else:
            self.gates = GateLogits(p.num_shared_experts, num_gates=d * t, dtype=self.dtype_policy,
                                    name="shared_gate_logits")
        self.domain_balance = Balance(d, p.arch_granularity, p.arch_init, group="domain",
                                      stop_gradient_others=self.aftb and p.aftb_domains, dtype=self.dtype_policy,
                                      name="domain_balance")
        self.task_balance = Balance(t, p.arch_granularity, p.arch_init, stop_gradient_others=self.aftb, group="task",
                                    dtype=self.dtype_policy, name="task_balance")
        self.amplitude = Amplitude(d, t, p.arch_granularity, p.arch_init, dtype=self.dtype_policy, name="amplitude")
        self.towers = Towers(t, p.tower_units, num_domains=d, norm="layer", epsilon=eps, dtype=self.dtype_policy,
                             name="towers")

    # ---------------------------------------------------------------------------
    def _bottom(self, x, domain, training):
        return self.bottom(self.star(x, domain), training=training) + self.skip(x, training=training)

    def _gate_weights(self, gate_input, domain, task_inputs=None, training=None):
        """Gate weights of each sample's own domain: [B, T, E]."""
        d, t = self.schema.num_domains, self.schema.num_tasks
        if isinstance(self.gates, GateLogits):
            weights = ops.reshape(self.gates(gate_input), (-1, d, t, self.gates.num_experts))
            return select_by_domain(weights, domain, d)
        own = ops.one_hot(domain, d, dtype="float32")  # DSelect-k: regularise only the gates a row uses
        if not self.aftb:
            if isinstance(self.gates, DSelectKGate):  # gate (domain, task) is number domain * t + task
                gates = self.gates(gate_input, training=training, active=ops.repeat(own, t, axis=1))
            else:
                gates = self.gates(gate_input, training=training)
            weights = ops.reshape(gates, (-1, d, t, self.gates.num_experts))
            return select_by_domain(weights, domain, d)
        per_task = []
        for i, gate in enumerate(self.gates):
            inputs = ops.concatenate([gate_input, ops.cast(task_inputs[:, i], gate_input.dtype)], axis=-1)
            weights = gate(inputs, training=training, active=own) if isinstance(gate, DSelectKGate) else gate(inputs)
            per_task.append(select_by_domain(weights, domain, d))  # [B, E]
        return ops.stack(per_task, axis=1)

    def _aftb_keep(self, domain):
        """[B, T, E]: 1 where tower (own domain, t) may train the expert."""
        s, p = self.schema, self.params
        d, t = s.num_domains, s.num_tasks
        batch = ops.shape(domain)[0]
        shared = ops.ones((batch, t, p.num_shared_experts))
        if p.aftb_domains:
            dom = ops.broadcast_to(ops.one_hot(domain, d)[:, None, :], (batch, t, d))
        else:
            dom = ops.ones((batch, t, d))
        task = ops.broadcast_to(ops.eye(t)[None], (batch, t, t))
        return ops.concatenate([shared, dom, task], axis=-1)

    def forward(self, features, training=None):
        domain = self.domain_index(features)
        embedded = self.embedding(features, training=training)
        x = self.flat_inputs(embedded, features)
        bottom = self._bottom(x, domain, training)
        on_bottom = self.experts(bottom)  # [B, S + D (+ T), H]
        # one split (its gradient is one concat) rather than slices (one full-size scatter each)
        groups = dict(zip(self.expert_slices, ops.split(on_bottom, self.expert_cuts, axis=1)))
        shared, domains = groups["shared"], groups["domain"]  # [B, S, H], [B, D, H]
        gate_input = ops.stop_gradient(bottom) if self.params.gate_stop_gradient else bottom
        if self.aftb:
            task_inputs = self.task_inputs(embedded, features, training)
            tasks = self.task_experts(task_inputs)  # [B, T, H], expert t on task t's embeddings
            weights = self._gate_weights(gate_input, domain, task_inputs, training)
            everything = ops.concatenate([on_bottom, tasks], axis=1)  # shared, domain, task experts
            shared_view = aftb_mix(weights, everything, self._aftb_keep(domain))
        else:
            tasks = groups["task"]
            weights = self._gate_weights(bottom, domain, training=training)  # the gate applies the stop_gradient
            shared_view = mix(weights, shared)  # [B, T, H]
        domain_view = select_by_domain(self.domain_balance(domains), domain, self.schema.num_domains)
        task_view = self.task_balance(tasks)
        fused = self.amplitude(shared_view, domain_view, task_view, domain)
        logits = self.towers(fused, domain)
        gate = Gate("all_experts" if self.aftb else "shared", weights)
        return self.probabilities(logits), Details(logits, gates=(gate,))
