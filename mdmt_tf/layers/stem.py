"""STEMLayer: one layer of STEM-Net (Su et al., AAAI 2024), stackable.

    shared input x_s   -> shared experts
    task input x_t     -> task t's experts
    task gate t        reads x_t + x_s ("sum") or concat(x_t, x_s) ("concat"), mixes ALL
                       experts; with AFTB the other tasks' experts are seen through
                       stop_gradient, so task t's output trains only the shared experts
                       and task t's own
    shared gate        (only when another layer follows) reads x_s, mixes all experts
                       with no stop_gradient; its output is the next layer's shared input

Experts are ordered [shared (S), task 0's (n), task 1's (n), ...] in the gate weights.
"""
from __future__ import annotations

import keras
import numpy as np
from keras import ops

from mdmt_tf.layers._util import check_positive_int, check_units, register
from mdmt_tf.layers.experts import ExpertGroup
from mdmt_tf.layers.gates import SoftmaxGate, aftb_mix, mix

GATE_INPUTS = ("sum", "concat")


@register
class STEMLayer(keras.layers.Layer):
    """call(task_inputs [B, T, in], shared_input [B, in]) -> (task_outputs [B, T, H],
    shared_output [B, H] or None without a shared gate, task_gate_weights [B, T, E]),
    E = num_shared_experts + num_tasks * num_task_experts, H = expert_units[-1].

    Args:
      gate_units: hidden widths of every gate's MLP (ReLU), then a Dense to E logits and
        a softmax; () = a linear gate.
      gate_input: "sum" (x_t + x_s; the widths must match) or "concat".
      aftb: stop_gradient on the other tasks' experts in task gates (False: the paper's
        All Forward All Backward ablation).
      shared_gate: build the shared gate and return its output (a layer that feeds
        another layer); False returns None in its place.
    """

    def __init__(self, num_tasks, num_task_experts, num_shared_experts, expert_units, gate_units=(128, 64),
                 gate_input="sum", aftb=True, shared_gate=False, **kwargs):
        super().__init__(**kwargs)
        self.num_tasks = check_positive_int(num_tasks, "num_tasks", "STEMLayer")
        self.num_task_experts = check_positive_int(num_task_experts, "num_task_experts", "STEMLayer")
        self.num_shared_experts = check_positive_int(num_shared_experts, "num_shared_experts", "STEMLayer")
        self.expert_units = check_units(expert_units, "expert_units", "STEMLayer")
        self.gate_units = check_units(gate_units, "gate_units", "STEMLayer", allow_empty=True)
        if gate_input not in GATE_INPUTS:
            raise ValueError(f"STEMLayer: `gate_input` must be one of {list(GATE_INPUTS)}, "
                             f"received gate_input={gate_input!r}")
        self.gate_input = gate_input
        self.aftb = bool(aftb)
        self.has_shared_gate = bool(shared_gate)
        t, n, s = self.num_tasks, self.num_task_experts, self.num_shared_experts
        self.num_experts = s + t * n
        self.shared_experts = ExpertGroup(s, self.expert_units, dtype=self.dtype_policy, name="shared_experts")
        self.task_experts = ExpertGroup(t * n, self.expert_units, dtype=self.dtype_policy, name="task_experts")
        self.task_gates = [SoftmaxGate(self.num_experts, hidden_units=self.gate_units, dtype=self.dtype_policy,
                                       name=f"gate_{i}")
                           for i in range(t)]
        self.shared_gate = (SoftmaxGate(self.num_experts, hidden_units=self.gate_units, dtype=self.dtype_policy,
                                        name="shared_gate")
                            if self.has_shared_gate else None)
        keep = np.zeros((t, self.num_experts), dtype="float32")
        keep[:, :s] = 1.0
        for i in range(t):
            keep[i, s + i * n:s + (i + 1) * n] = 1.0
        self.keep = keep  # [T, E]: the experts task gate t may train

    def build(self, task_inputs_shape, shared_input_shape):
        task_inputs_shape, shared_input_shape = tuple(task_inputs_shape), tuple(shared_input_shape)
        if len(task_inputs_shape) != 3 or task_inputs_shape[1] != self.num_tasks or len(shared_input_shape) != 2:
            raise ValueError(f"STEMLayer: inputs must be task_inputs [batch, num_tasks={self.num_tasks}, features] "
                             f"and shared_input [batch, features], received shapes {task_inputs_shape} and "
                             f"{shared_input_shape}")
        task_in, shared_in = task_inputs_shape[-1], shared_input_shape[-1]
        if self.gate_input == "sum" and task_in != shared_in:
            raise ValueError(f"STEMLayer: gate_input='sum' needs task and shared inputs of one width, received "
                             f"{task_in} and {shared_in}")
        self.task_experts.build((None, self.num_tasks * self.num_task_experts, task_in))
        self.shared_experts.build((None, shared_in))
        gate_in = task_in if self.gate_input == "sum" else task_in + shared_in
        for gate in self.task_gates:
            gate.build((None, gate_in))
        if self.shared_gate is not None:
            self.shared_gate.build((None, shared_in))

    def _gate_input(self, x_task, x_shared):
        if self.gate_input == "sum":
            return x_task + x_shared
        return ops.concatenate([x_task, x_shared], axis=-1)

    def call(self, task_inputs, shared_input):
        shared = self.shared_experts(shared_input)  # [B, S, H]
        tasks = self.task_experts(ops.repeat(task_inputs, self.num_task_experts, axis=1))  # [B, T*n, H]
        everything = ops.concatenate([shared, tasks], axis=1)  # [B, E, H]
        weights = ops.stack([gate(self._gate_input(task_inputs[:, i], shared_input))[:, 0]
                             for i, gate in enumerate(self.task_gates)], axis=1)  # [B, T, E]
        task_outputs = aftb_mix(weights, everything, self.keep) if self.aftb else mix(weights, everything)
        shared_output = None
        if self.shared_gate is not None:
            shared_output = mix(self.shared_gate(shared_input), everything)[:, 0]  # [B, H]
        return task_outputs, shared_output, weights

    def get_config(self):
        return {**super().get_config(), "num_tasks": self.num_tasks, "num_task_experts": self.num_task_experts,
                "num_shared_experts": self.num_shared_experts, "expert_units": list(self.expert_units),
                "gate_units": list(self.gate_units), "gate_input": self.gate_input, "aftb": self.aftb,
                "shared_gate": self.has_shared_gate}
