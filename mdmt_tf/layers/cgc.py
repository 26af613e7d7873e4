"""CGC: the customized gate control level of PLE (Tang et al., RecSys 2020)."""
from __future__ import annotations

import keras
from keras import ops

from mdmt_tf.layers._util import check_positive_int, check_units, register
from mdmt_tf.layers.experts import ExpertGroup
from mdmt_tf.layers.gates import DSelectKGate

GATINGS = ("softmax", "dselect_k")


@register
class CGC(keras.layers.Layer):
    """One extraction level: task experts, shared experts, a gate per task over (its own +
    shared) experts, and, unless it is the last level, a shared gate over all experts.

    call(task_inputs [B, T, in], shared_input [B, in]) -> (task_outputs [B, T, H],
    shared_output [B, H] or None, task_gate_weights [B, T, n_task + n_shared]).

    gating: "softmax" (PLE's gates: softmax of a linear map of the gate's input) or
    "dselect_k" (a DSelectKGate per task, `task_gate_<t>`, and for the shared gate, each
    selecting at most `k` experts; `gamma` and `entropy_weight` as in DSelectKGate; the
    entropy regulariser joins the layer's losses in training passes).
    """

    def __init__(self, num_tasks, num_task_experts, num_shared_experts, expert_units, last_level=False,
                 gating="softmax", k=2, gamma=1.0, entropy_weight=0.0, **kwargs):
        super().__init__(**kwargs)
        self.num_tasks = check_positive_int(num_tasks, "num_tasks", "CGC")
        self.num_task_experts = check_positive_int(num_task_experts, "num_task_experts", "CGC")
        self.num_shared_experts = check_positive_int(num_shared_experts, "num_shared_experts", "CGC")
        self.expert_units = check_units(expert_units, "expert_units", "CGC")
        self.last_level = bool(last_level)
        if gating not in GATINGS:
            raise ValueError(f"CGC: `gating` must be one of {GATINGS}, received gating={gating!r}")
        self.gating, self.k, self.gamma, self.entropy_weight = gating, k, gamma, entropy_weight
        t, nt, ns = self.num_tasks, self.num_task_experts, self.num_shared_experts
        self.task_experts = ExpertGroup(t * nt, self.expert_units, dtype=self.dtype_policy, name="task_experts")
        self.shared_experts = ExpertGroup(ns, self.expert_units, dtype=self.dtype_policy, name="shared_experts")
        if gating == "dselect_k":
            def gate(n, name):
                return DSelectKGate(n, k=k, gamma=gamma, entropy_weight=entropy_weight, dtype=self.dtype_policy,
                                    name=name)

            self.task_gates = [gate(nt + ns, f"task_gate_{i}") for i in range(t)]
            if not self.last_level:
                self.shared_gate = gate(t * nt + ns, "shared_gate")

    def build(self, task_inputs_shape, shared_input_shape):
        t, nt, ns, fan_in = self.num_tasks, self.num_task_experts, self.num_shared_experts, task_inputs_shape[-1]
        self.task_experts.build((None, t * nt, fan_in))
        self.shared_experts.build((None, fan_in))
        if self.gating == "dselect_k":
            for gate in self.task_gates:
                gate.build((None, fan_in))
            if not self.last_level:
                self.shared_gate.build((None, shared_input_shape[-1]))
            return
        self.task_gate_kernel = self.add_weight(name="task_gate_kernel", shape=(t, fan_in, nt + ns),
                                                initializer="glorot_uniform")
        self.task_gate_bias = self.add_weight(name="task_gate_bias", shape=(t, nt + ns), initializer="zeros")
        if not self.last_level:
            self.shared_gate = keras.layers.Dense(t * nt + ns, dtype=self.dtype_policy, name="shared_gate")
            self.shared_gate.build((None, fan_in))

    def call(self, task_inputs, shared_input, training=None):
        t, nt, ns = self.num_tasks, self.num_task_experts, self.num_shared_experts
        task_out = self.task_experts(ops.repeat(task_inputs, nt, axis=1))  # [B, T*nt, H]
        shared_out = self.shared_experts(shared_input)  # [B, ns, H]
        h = task_out.shape[-1]
        own = ops.reshape(task_out, (-1, t, nt, h))
        shared = ops.broadcast_to(shared_out[:, None], (ops.shape(shared_out)[0], t, ns, h))
        candidates = ops.concatenate([own, shared], axis=2)  # [B, T, nt+ns, H]
        if self.gating == "dselect_k":
            weights = ops.concatenate([gate(task_inputs[:, i], training=training)
                                       for i, gate in enumerate(self.task_gates)], axis=1)  # [B, T, nt+ns]
        else:
            weights = ops.softmax(ops.einsum("bti,tie->bte", task_inputs, self.task_gate_kernel)
                                  + self.task_gate_bias)
        task_outputs = ops.einsum("bte,bteh->bth", ops.cast(weights, candidates.dtype), candidates)
        shared_output = None
        if not self.last_level:
            everything = ops.concatenate([task_out, shared_out], axis=1)
            if self.gating == "dselect_k":
                shared_weights = self.shared_gate(shared_input, training=training)[:, 0]
            else:
                shared_weights = ops.softmax(self.shared_gate(shared_input))
            shared_output = ops.einsum("be,beh->bh", ops.cast(shared_weights, everything.dtype), everything)
        return task_outputs, shared_output, weights

    def get_config(self):
        return {**super().get_config(), "num_tasks": self.num_tasks, "num_task_experts": self.num_task_experts,
                "num_shared_experts": self.num_shared_experts, "expert_units": list(self.expert_units),
                "last_level": self.last_level, "gating": self.gating, "k": self.k, "gamma": self.gamma,
                "entropy_weight": self.entropy_weight}
