"""STEM-Net (Su et al., AAAI 2024): shared and task-specific embeddings with
All-Forward-Task-specific-Backward (AFTB) gating, as the paper and the authors' code.

    shared table      -> x_s -> shared experts
    task t's table    -> x_t -> task t's experts (fields outside task_embedding_fields
                                 use the shared embedding)
    gate of task t    reads x_t + x_s, mixes ALL experts forward; the other tasks'
                      experts are seen through stop_gradient, so task t's loss trains only
                      the shared experts, its own experts and its own embeddings
    shared gate       reads x_s, mixes all experts (no stop_gradient); only between
                      stacked layers
    tower per task    on the last layer's task outputs; the domain is an embedded input
                      feature.

Each gate is an MLP (gate_units, ReLU; default 128 -> 64 as the authors' code), a Dense
to the number of experts and a softmax. Deliberate difference: the authors' MLP also
applies its hidden activation (ReLU) to the gate logits before the softmax; here the
logits are linear.

num_layers stacks STEM layers (mdmt_tf.layers.STEMLayer) like PLE's levels: layer l+1's
task-t input is layer l's task-t gate output, its shared input is layer l's shared-gate
output. Layer 0 reads task t's embeddings (MDMTModel.task_inputs) and the shared ones.
The shared gate is built only in layers that feed another layer (with one layer, none).
As in the authors' code it has no stop_gradient, so with num_layers >= 2 task t's loss
reaches the other tasks' lower-layer experts and embeddings through the next layer's
shared input; the last layer's other-task experts still get none.

gate_input="sum" (the default) is the authors' code; "concat" (concat(x_t, x_s)) is this
library's previous behaviour: the same information at twice the gate's input width.
aftb=False drops the stop_gradient (All Forward All Backward, the paper's ablation).
"""
from __future__ import annotations

import dataclasses

from mdmt_tf.layers import STEMLayer, Towers
from mdmt_tf.layers._util import register
from mdmt_tf.models.base import MDMTModel
from mdmt_tf.models.details import Details, Gate
from mdmt_tf.models.params import Params


@dataclasses.dataclass(frozen=True)
class STEMParams(Params):
    num_shared_experts: int = 2
    num_task_experts: int = 1
    expert_units: tuple[int, ...] = (256, 64)
    tower_units: tuple[int, ...] = (64,)
    gate_units: tuple[int, ...] = (128, 64)  # () = a linear gate
    gate_input: str = "sum"
    num_layers: int = 1
    aftb: bool = True
    task_embedding_fields: tuple[str, ...] = ()  # () = every sparse field (the paper's best variant)

    CHOICES = {"gate_input": ("sum", "concat")}
    MAY_BE_EMPTY = Params.MAY_BE_EMPTY | {"tower_units", "task_embedding_fields", "gate_units"}


@register
class STEM(MDMTModel):
    Params = STEMParams
    params: STEMParams

    def build_layers(self):
        s, p = self.schema, self.params
        self.embedding = self.make_embedding()
        self.make_task_embeddings(p.task_embedding_fields)
        self.stem_layers = [
            STEMLayer(s.num_tasks, p.num_task_experts, p.num_shared_experts, p.expert_units,
                      gate_units=p.gate_units, gate_input=p.gate_input, aftb=p.aftb,
                      shared_gate=i < p.num_layers - 1, dtype=self.dtype_policy, name=f"stem_{i}")
            for i in range(p.num_layers)]
        self.towers = Towers(s.num_tasks, p.tower_units, dtype=self.dtype_policy, name="towers")

    @property
    def shared_experts(self):
        """The first layer's shared experts (the only layer's by default)."""
        return self.stem_layers[0].shared_experts

    @property
    def task_experts(self):
        """The first layer's task experts [task 0's, task 1's, ...] (the only layer's by default)."""
        return self.stem_layers[0].task_experts

    def forward(self, features, training=None):
        embedded = self.embedding(features, training=training)
        x_shared = self.flat_inputs(embedded, features)  # [B, n_in]
        x_tasks = self.task_inputs(embedded, features, training)  # [B, T, n_in]
        for layer in self.stem_layers:
            x_tasks, x_shared, weights = layer(x_tasks, x_shared)
        logits = self.towers(x_tasks)
        return self.probabilities(logits), Details(logits, gates=(Gate("tasks", weights),))
