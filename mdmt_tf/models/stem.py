"""STEM-Net (Su et al., AAAI 2024): shared and task-specific embeddings with
All-Forward-Task-specific-Backward (AFTB) gating.

    shared table      -> x_s -> shared experts
    task t's table    -> x_t -> task t's experts (fields outside task_embedding_fields
                                 use the shared embedding)
    gate of task t    reads concat(x_t, x_s), mixes ALL experts forward; the other tasks'
                      experts are seen through stop_gradient, so task t's loss trains only
                      the shared experts, its own experts and its own embeddings
    tower per task;   the domain is an embedded input feature.

aftb=False drops the stop_gradient (All Forward All Backward, the paper's ablation).
"""
from __future__ import annotations

import dataclasses

import numpy as np
from keras import ops

from mdmt_tf.layers import ExpertGroup, SoftmaxGate, Towers, aftb_mix, mix
from mdmt_tf.layers._util import register
from mdmt_tf.models.base import MDMTModel
from mdmt_tf.models.params import Params


@dataclasses.dataclass(frozen=True)
class STEMParams(Params):
    num_shared_experts: int = 2
    num_task_experts: int = 1
    expert_units: tuple[int, ...] = (256, 64)
    tower_units: tuple[int, ...] = (64,)
    aftb: bool = True
    task_embedding_fields: tuple[str, ...] = ()  # () = every sparse field (the paper's best variant)

    MAY_BE_EMPTY = Params.MAY_BE_EMPTY | {"tower_units", "task_embedding_fields"}


@register
class STEM(MDMTModel):
    Params = STEMParams

    def build_layers(self):
        s, p = self.schema, self.params
        t = s.num_tasks
        self.embedding = self.make_embedding()
        self.make_task_embeddings(p.task_embedding_fields)
        self.shared_experts = ExpertGroup(p.num_shared_experts, p.expert_units, name="shared_experts")
        self.task_experts = ExpertGroup(t * p.num_task_experts, p.expert_units, name="task_experts")
        num_experts = p.num_shared_experts + t * p.num_task_experts
        self.gates = [SoftmaxGate(num_experts, name=f"gate_{i}") for i in range(t)]
        self.towers = Towers(t, p.tower_units, name="towers")
        keep = np.zeros((t, num_experts), dtype="float32")
        keep[:, :p.num_shared_experts] = 1.0
        for i in range(t):
            start = p.num_shared_experts + i * p.num_task_experts
            keep[i, start:start + p.num_task_experts] = 1.0
        self.keep = keep  # [T, E]: what gate t may train

    def forward(self, features, training=None):
        p = self.params
        embedded = self.embedding(features, training=training)
        x_shared = self.flat_inputs(embedded, features)
        x_tasks = self.task_inputs(embedded, features, training)  # [B, T, n_in]
        shared = self.shared_experts(x_shared)  # [B, S, H]
        tasks = self.task_experts(ops.repeat(x_tasks, p.num_task_experts, axis=1))  # [B, T*n, H]
        everything = ops.concatenate([shared, tasks], axis=1)
        weights = ops.stack([gate(ops.concatenate([x_tasks[:, i], x_shared], axis=-1))[:, 0]
                             for i, gate in enumerate(self.gates)], axis=1)  # [B, T, E]
        mixed = aftb_mix(weights, everything, self.keep) if p.aftb else mix(weights, everything)
        logits = self.towers(mixed)
        return self.probabilities(logits), {"logits": logits, "gates/tasks": weights}
