"""The baselines users compare against, each a small composition of mdmt_tf.layers.

Multi-task baselines (Shared-Bottom, MMoE, PLE, the single-task MLPs) become
multi-domain through the domain feature (an embedded field); STAR and PEPNet use their
own domain mechanisms, as in the joint-modeling tutorial.
"""
from __future__ import annotations

import dataclasses

from keras import layers, ops

from mdmt_tf.errors import ConfigError
from mdmt_tf.layers import (
    CGC,
    MLP,
    DSelectKGate,
    EPNet,
    ExpertGroup,
    PartitionedNorm,
    PPNetTowers,
    SoftmaxGate,
    StarFC,
    Towers,
    mix,
)
from mdmt_tf.layers._util import register
from mdmt_tf.models.base import MDMTModel
from mdmt_tf.models.details import Details, Gate, Scaling
from mdmt_tf.models.params import Params

TOWERS_MAY_BE_EMPTY = Params.MAY_BE_EMPTY | {"tower_units"}

# DSelect-k (Hazimeh et al., NeurIPS 2021) as a gate option: its hyper-parameters' defaults.
# k = 2: the authors' code's example (DSelectKGate(num_nonzeros=2)); gamma = 1.0: their
# code's default; entropy 1e-3 (ours): their regulariser's default weight is 1e-6 summed over
# the batch, ~2e-3 per example at batch 2048; ours is averaged over the batch.
DSELECT_K, DSELECT_GAMMA, DSELECT_ENTROPY = 2, 1.0, 1e-3


def check_dselect(model: str, k: int, gamma: float, entropy: float, experts: dict[str, int] | None) -> None:
    """ConfigError unless the DSelect-k hyper-parameters are valid; `experts` names each gate
    the option applies to with the number of experts it selects from (None: the option is not
    used, only the ranges are checked)."""
    if k < 1:
        raise ConfigError(f"{model}: dselect_k must be >= 1, got {k}")
    if not gamma > 0:
        raise ConfigError(f"{model}: dselect_gamma must be > 0, got {gamma}")
    if entropy < 0:
        raise ConfigError(f"{model}: dselect_entropy must be >= 0, got {entropy}")
    for gate, n in (experts or {}).items():
        if n < 2:
            raise ConfigError(f"{model}: DSelect-k gating needs at least 2 experts per gate; {gate} has {n}")
        if k > n:
            raise ConfigError(f"{model}: dselect_k={k} exceeds the {n} experts of {gate}; choose 1 <= dselect_k <= {n}")


# ------------------------------------------------------------------ single-task MLP
@dataclasses.dataclass(frozen=True)
class MLPParams(Params):
    units: tuple[int, ...] = (256, 128, 64)


@register
class SingleTaskMLP(MDMTModel):
    """One independent MLP per task (own embeddings, own layers): T single-task models in
    one Keras model. Their parameters are disjoint, so training them together equals
    training each alone on its task."""

    Params = MLPParams
    params: MLPParams

    def build_layers(self):
        p = self.params
        self.embeddings = [self.make_embedding(f"embedding_{t}") for t in self.schema.tasks]
        self.mlps = [MLP(p.units, dropout=p.dropout, dtype=self.dtype_policy,
                         name=f"mlp_{t}") for t in self.schema.tasks]
        self.heads = [layers.Dense(1, dtype=self.dtype_policy, name=f"head_{t}") for t in self.schema.tasks]

    def forward(self, features, training=None):
        logits = [head(mlp(self.flat_inputs(emb(features, training=training), features), training=training))
                  for emb, mlp, head in zip(self.embeddings, self.mlps, self.heads)]
        logits = ops.concatenate(logits, axis=1)
        return self.probabilities(logits), Details(logits)


# ------------------------------------------------------------------- Shared-Bottom
@dataclasses.dataclass(frozen=True)
class SharedBottomParams(Params):
    bottom_units: tuple[int, ...] = (256, 128)
    tower_units: tuple[int, ...] = (64,)
    MAY_BE_EMPTY = TOWERS_MAY_BE_EMPTY


@register
class SharedBottom(MDMTModel):
    """Hard parameter sharing: one bottom MLP, one tower per task."""

    Params = SharedBottomParams
    params: SharedBottomParams

    def build_layers(self):
        p = self.params
        self.embedding = self.make_embedding()
        self.bottom = MLP(p.bottom_units, dropout=p.dropout, dtype=self.dtype_policy, name="bottom")
        self.towers = Towers(self.schema.num_tasks, p.tower_units, dtype=self.dtype_policy, name="towers")

    def forward(self, features, training=None):
        x = self.flat_inputs(self.embedding(features, training=training), features)
        logits = self.towers(self.bottom(x, training=training))
        return self.probabilities(logits), Details(logits)


# ---------------------------------------------------------------------------- MMoE
@dataclasses.dataclass(frozen=True)
class MMoEParams(Params):
    """gates: "per_task" (MMoE) or "one" softmax gate shared by every task (OMoE, Ma et al.
      2018's one-gate baseline: the `omoe` model).
    multi_embedding: an embedding table per expert, each expert reading its own (ME-MMoE,
      STEM's multi-embedding baseline: the `me_mmoe` model); the gates read the mean of the
      experts' inputs. Every task's loss still reaches every table through the gates (All
      Forward All Backward), which is what STEM contrasts with task-specific embeddings.
    gating: "softmax" (MMoE's gates) or "dselect_k": DSelect-k gates (Hazimeh et al., NeurIPS
      2021; layers.DSelectKGate), each mixing at most `dselect_k` experts (<= num_experts),
      smooth-step width `dselect_gamma`, entropy regulariser weight `dselect_entropy`."""

    num_experts: int = 4
    expert_units: tuple[int, ...] = (256, 64)
    tower_units: tuple[int, ...] = (64,)
    gates: str = "per_task"
    multi_embedding: bool = False
    gating: str = "softmax"
    dselect_k: int = DSELECT_K
    dselect_gamma: float = DSELECT_GAMMA
    dselect_entropy: float = DSELECT_ENTROPY
    MAY_BE_EMPTY = TOWERS_MAY_BE_EMPTY
    CHOICES = {"gates": ("per_task", "one"), "gating": ("softmax", "dselect_k")}

    def validate(self, model):
        super().validate(model)
        check_dselect(model, self.dselect_k, self.dselect_gamma, self.dselect_entropy,
                      {"each gate": self.num_experts} if self.gating == "dselect_k" else None)


@register
class MMoE(MDMTModel):
    """Multi-gate mixture of experts (Ma et al., KDD 2018): shared experts, a softmax gate
    per task, a tower per task; OMoE with one gate for all tasks; ME-MMoE with a table per
    expert; DSelect-k gates instead of softmax ones with gating="dselect_k" (MMoEParams)."""

    Params = MMoEParams
    params: MMoEParams

    def build_layers(self):
        p = self.params
        if p.multi_embedding:
            self.expert_embeddings = [self.make_embedding(f"expert_embedding_{i}") for i in range(p.num_experts)]
        else:
            self.embedding = self.make_embedding()
        self.experts = ExpertGroup(p.num_experts, p.expert_units, dtype=self.dtype_policy, name="experts")
        gates = 1 if p.gates == "one" else self.schema.num_tasks
        self.gates: SoftmaxGate | DSelectKGate
        if p.gating == "dselect_k":
            self.gates = DSelectKGate(p.num_experts, num_gates=gates, k=p.dselect_k, gamma=p.dselect_gamma,
                                      entropy_weight=p.dselect_entropy, dtype=self.dtype_policy, name="gates")
        else:
            self.gates = SoftmaxGate(p.num_experts, num_gates=gates, dtype=self.dtype_policy, name="gates")
        self.towers = Towers(self.schema.num_tasks, p.tower_units, dtype=self.dtype_policy, name="towers")

    def forward(self, features, training=None):
        if self.params.multi_embedding:  # expert e reads table e: [B, E, in]; the gates read their mean
            inputs = ops.stack([self.flat_inputs(table(features, training=training), features)
                                for table in self.expert_embeddings], axis=1)
            x = ops.mean(inputs, axis=1)
        else:
            inputs = x = self.flat_inputs(self.embedding(features, training=training), features)
        weights = self.gates(x, training=training)
        if self.params.gates == "one":  # one gate, every task's
            weights = ops.broadcast_to(weights, (ops.shape(weights)[0], self.schema.num_tasks, weights.shape[-1]))
        logits = self.towers(mix(weights, self.experts(inputs)))
        return self.probabilities(logits), Details(logits, gates=(Gate("tasks", weights),))


# ----------------------------------------------------------------------------- PLE
@dataclasses.dataclass(frozen=True)
class PLEParams(Params):
    num_levels: int = 2
    num_task_experts: int = 1
    num_shared_experts: int = 2
    expert_units: tuple[int, ...] = (256, 64)
    tower_units: tuple[int, ...] = (64,)
    multi_embedding: bool = False
    gating: str = "softmax"
    dselect_k: int = DSELECT_K
    dselect_gamma: float = DSELECT_GAMMA
    dselect_entropy: float = DSELECT_ENTROPY
    MAY_BE_EMPTY = TOWERS_MAY_BE_EMPTY
    CHOICES = {"gating": ("softmax", "dselect_k")}

    def validate(self, model):
        super().validate(model)
        if self.num_levels < 2:
            raise ConfigError(f"{model}: PLE needs num_levels >= 2 extraction levels (1 is CGC), got {self.num_levels}")
        # a task gate selects among its own + the shared experts; the shared gates see more
        check_dselect(model, self.dselect_k, self.dselect_gamma, self.dselect_entropy,
                      {"a task gate (num_task_experts + num_shared_experts)":
                       self.num_task_experts + self.num_shared_experts} if self.gating == "dselect_k" else None)


@register
class PLE(MDMTModel):
    """Progressive layered extraction (Tang et al., RecSys 2020): stacked CGC levels. With
    multi_embedding (ME-PLE, STEM's baseline: the `me_ple` model) each task's experts and
    gate read the task's own embedding table and the shared experts a shared one. With
    gating="dselect_k" every gate of every level (task and shared) is a DSelect-k gate
    (PLEParams: dselect_k, dselect_gamma, dselect_entropy as in MMoEParams)."""

    Params = PLEParams
    params: PLEParams

    def build_layers(self):
        p, t = self.params, self.schema.num_tasks
        self.embedding = self.make_embedding()
        if p.multi_embedding:
            self.task_tables = [self.make_embedding(f"task_embedding_{i}") for i in range(t)]
        self.levels = [CGC(t, p.num_task_experts, p.num_shared_experts, p.expert_units,
                           last_level=i == p.num_levels - 1, gating=p.gating, k=p.dselect_k, gamma=p.dselect_gamma,
                           entropy_weight=p.dselect_entropy, dtype=self.dtype_policy,
                           name=f"cgc_{i}") for i in range(p.num_levels)]
        self.towers = Towers(t, p.tower_units, dtype=self.dtype_policy, name="towers")

    def forward(self, features, training=None):
        x = self.flat_inputs(self.embedding(features, training=training), features)
        if self.params.multi_embedding:  # [B, T, in]: task t's own table
            task_x = ops.stack([self.flat_inputs(table(features, training=training), features)
                                for table in self.task_tables], axis=1)
        else:
            task_x = ops.broadcast_to(x[:, None, :], (ops.shape(x)[0], self.schema.num_tasks, x.shape[-1]))
        shared_x = x
        for level in self.levels:
            task_x, shared_x, weights = level(task_x, shared_x, training=training)
        logits = self.towers(task_x)
        return self.probabilities(logits), Details(logits, gates=(Gate("tasks", weights),))


# ---------------------------------------------------------------------------- STAR
@dataclasses.dataclass(frozen=True)
class STARParams(Params):
    star_units: tuple[int, ...] = (256, 128, 64)
    aux_units: tuple[int, ...] = (64,)
    # momentum of partitioned norm's moving statistics, which inference uses. 0.9, not
    # BatchNormalization's 0.99: with tens of steps per epoch, 0.99 leaves the statistics
    # stale for hundreds of steps (ML-100K: test AUC 0.781 -> 0.791, logloss 0.61 -> 0.49)
    norm_momentum: float = 0.9


@register
class STAR(MDMTModel):
    """Star topology adaptive recommender (Sheng et al., CIKM 2021): partitioned
    normalisation, star-topology FC layers (shared * domain weights) ending in one logit
    per task, plus an auxiliary network on the domain indicator whose logit is added."""

    Params = STARParams
    params: STARParams

    def build_layers(self):
        p, s = self.params, self.schema
        self.embedding = self.make_embedding(with_domain=False)
        self.domain_embedding = layers.Embedding(s.num_domains, p.embedding_dim, dtype=self.dtype_policy,
                                                 name="domain_embedding")
        self.norm = PartitionedNorm(s.num_domains, momentum=p.norm_momentum, dtype=self.dtype_policy,
                                    name="partitioned_norm")
        self.star_layers = [StarFC(s.num_domains, u, activation="relu", dtype=self.dtype_policy, name=f"star_fc_{i}")
                            for i, u in enumerate(p.star_units)]
        self.star_out = StarFC(s.num_domains, s.num_tasks, dtype=self.dtype_policy, name="star_out")
        self.aux = MLP(p.aux_units + (s.num_tasks,), activate_last=False, dtype=self.dtype_policy, name="auxiliary")

    def forward(self, features, training=None):
        domain = self.domain_index(features)
        h = self.norm(self.flat_inputs(self.embedding(features, training=training), features), domain,
                      training=training)
        for layer in self.star_layers:
            h = layer(h, domain)
        logits = self.star_out(h, domain) + self.aux(self.domain_embedding(domain))
        return self.probabilities(logits), Details(logits)


# --------------------------------------------------------------------------- PEPNet
@dataclasses.dataclass(frozen=True)
class PEPNetParams(Params):
    tower_units: tuple[int, ...] = (128, 64)
    gate_hidden_units: int = 64
    gate_scale: float = 2.0
    prior_fields: tuple[str, ...] = ("user_id", "item_id")  # personalised priors; absent ones are skipped
    MAY_BE_EMPTY = TOWERS_MAY_BE_EMPTY


@register
class PEPNet(MDMTModel):
    """Parameter and embedding personalised network (Chang et al., KDD 2023): EPNet scales
    the general embeddings by a Gate NU of the domain embedding; PPNet scales every tower
    layer's input by a Gate NU of the prior (user / item id) embeddings.

    Details scalings: "epnet" [B, n_in] (EPNet's Gate NU per input unit) and "ppnet_<l>"
    [B, T, width_l] (PPNet's Gate NU of tower layer l's input), each in (0, gate_scale)."""

    Params = PEPNetParams
    params: PEPNetParams

    def build_layers(self):
        p, s = self.params, self.schema
        self.prior = tuple(f for f in p.prior_fields if f in s.sparse_names) or s.sparse_names
        self.embedding = self.make_embedding(with_domain=False)
        self.domain_embedding = layers.Embedding(s.num_domains, p.embedding_dim, dtype=self.dtype_policy,
                                                 name="domain_embedding")
        self.epnet = EPNet(p.gate_hidden_units, p.gate_scale, dtype=self.dtype_policy, name="epnet")
        self.ppnet = PPNetTowers(s.num_tasks, p.tower_units, p.gate_hidden_units, p.gate_scale,
                                 dtype=self.dtype_policy, name="ppnet")

    def forward(self, features, training=None):
        embedded = self.embedding(features, training=training)
        general = self.flat_inputs(embedded, features)
        o_ep, ep_gate = self.epnet(general, self.domain_embedding(self.domain_index(features)), return_gate=True)
        position = {f: i for i, f in enumerate(self.embedding.fields)}
        prior = ops.concatenate([embedded[:, position[f]] for f in self.prior], axis=-1)
        logits, pp_gates = self.ppnet(o_ep, prior, return_gates=True)
        # Gate NU scalings, in (0, gate_scale): they scale units, they are not weights over experts
        scalings = (Scaling("epnet", ep_gate),) + tuple(Scaling(f"ppnet_{i}", d) for i, d in enumerate(pp_gates))
        return self.probabilities(logits), Details(logits, scalings=scalings)
