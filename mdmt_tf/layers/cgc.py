"""CGC: the customized gate control level of PLE (Tang et al., RecSys 2020)."""
from __future__ import annotations

import keras
from keras import ops

from mdmt_tf.layers._util import check_positive_int, check_units, register
from mdmt_tf.layers.experts import ExpertGroup


@register
class CGC(keras.layers.Layer):
    """One extraction level: task experts, shared experts, a gate per task over (its own +
    shared) experts, and, unless it is the last level, a shared gate over all experts.

    call(task_inputs [B, T, in], shared_input [B, in]) -> (task_outputs [B, T, H],
    shared_output [B, H] or None, task_gate_weights [B, T, n_task + n_shared]).
    """

    def __init__(self, num_tasks, num_task_experts, num_shared_experts, expert_units, last_level=False, **kwargs):
        super().__init__(**kwargs)
        self.num_tasks = check_positive_int(num_tasks, "num_tasks", "CGC")
        self.num_task_experts = check_positive_int(num_task_experts, "num_task_experts", "CGC")
        self.num_shared_experts = check_positive_int(num_shared_experts, "num_shared_experts", "CGC")
        self.expert_units = check_units(expert_units, "expert_units", "CGC")
        self.last_level = bool(last_level)
        t, nt, ns = self.num_tasks, self.num_task_experts, self.num_shared_experts
        self.task_experts = ExpertGroup(t * nt, self.expert_units, dtype=self.dtype_policy, name="task_experts")
        self.shared_experts = ExpertGroup(ns, self.expert_units, dtype=self.dtype_policy, name="shared_experts")

    def build(self, task_inputs_shape, shared_input_shape):
        t, nt, ns, fan_in = self.num_tasks, self.num_task_experts, self.num_shared_experts, task_inputs_shape[-1]
        self.task_experts.build((None, t * nt, fan_in))
        self.shared_experts.build((None, fan_in))
        self.task_gate_kernel = self.add_weight(name="task_gate_kernel", shape=(t, fan_in, nt + ns),
                                                initializer="glorot_uniform")
        self.task_gate_bias = self.add_weight(name="task_gate_bias", shape=(t, nt + ns), initializer="zeros")
        if not self.last_level:
            self.shared_gate = keras.layers.Dense(t * nt + ns, dtype=self.dtype_policy, name="shared_gate")
            self.shared_gate.build((None, fan_in))

    def call(self, task_inputs, shared_input):
        t, nt, ns = self.num_tasks, self.num_task_experts, self.num_shared_experts
        task_out = self.task_experts(ops.repeat(task_inputs, nt, axis=1))  # [B, T*nt, H]
        shared_out = self.shared_experts(shared_input)  # [B, ns, H]
        h = task_out.shape[-1]
        own = ops.reshape(task_out, (-1, t, nt, h))
        shared = ops.broadcast_to(shared_out[:, None], (ops.shape(shared_out)[0], t, ns, h))
        candidates = ops.concatenate([own, shared], axis=2)  # [B, T, nt+ns, H]
        weights = ops.softmax(ops.einsum("bti,tie->bte", task_inputs, self.task_gate_kernel) + self.task_gate_bias)
        task_outputs = ops.einsum("bte,bteh->bth", weights, candidates)
        shared_output = None
        if not self.last_level:
            everything = ops.concatenate([task_out, shared_out], axis=1)
            shared_weights = ops.softmax(self.shared_gate(shared_input))
            shared_output = ops.einsum("be,beh->bh", shared_weights, everything)
        return task_outputs, shared_output, weights

    def get_config(self):
        return {**super().get_config(), "num_tasks": self.num_tasks, "num_task_experts": self.num_task_experts,
                "num_shared_experts": self.num_shared_experts, "expert_units": list(self.expert_units),
                "last_level": self.last_level}
