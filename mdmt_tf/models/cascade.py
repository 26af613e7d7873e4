"""Cascade models: ESMM and AITM.

ESMM: see its class doc.

AITM (Xi et al., KDD 2021; seed 002's "cascaded task relationship") models a conversion
funnel in the spec's task order (e.g. click -> like). Each task t has a tower over the
shared embeddings giving q_t. From the second task on, the previous task's representation
z_{t-1} is carried over by a transfer layer, p_{t-1} = relu(W z_{t-1} + b), and the
Adaptive Information Transfer module attends over the two candidates u in {p_{t-1}, q_t}:

    w_u = softmax_u( <h1(u), h2(u)> / sqrt(k) ),   z_t = sum_u w_u h3(u)

with h1, h2, h3 linear maps to k dimensions (z_0 = q_0). The task's probability is
sigmoid(Dense(z_t)). Training adds the behavioural-expectation calibrator

    L_lc = calibrator_weight * mean_n sum_{t >= 1} max(y_t - y_{t-1}, 0)

which penalises a later step of the funnel being likelier than the one before it; so
AITM, like ESMM, checks that the training labels are nested. Information only flows
forward: task t's output does not depend on a later task's weights.
"""
from __future__ import annotations

import dataclasses
import math

from keras import layers, ops

from mdmt_tf.errors import ConfigError
from mdmt_tf.layers import ExpertGroup, Towers
from mdmt_tf.layers._util import register
from mdmt_tf.models.base import MDMTModel
from mdmt_tf.models.details import Details
from mdmt_tf.models.params import Params


@dataclasses.dataclass(frozen=True)
class ESMMParams(Params):
    """tower_units: each task tower's hidden layers.
    allow_unnested: train even if the training labels are not nested (some row positive
      for task k but not for task k-1, e.g. like=1 with click=0); by default that stops
      training with an error naming the first such row (mdmt_tf.data.checks). When true,
      one line on stderr counts those rows, and the outputs are then not the cascade's
      probabilities."""

    tower_units: tuple[int, ...] = (128, 64)
    allow_unnested: bool = False


@register
class ESMM(MDMTModel):
    """Entire space multi-task model (Ma et al., SIGIR 2018) as a cascade over the tasks in
    spec order: p(task_0) = sigmoid(l_0) and p(task_k) = p(task_{k-1}) * sigmoid(l_k), e.g.
    p(like) = p(click) * p(like | click). Every output is trained on the entire space.
    That is a likelihood only for nested labels (every like is a click): training checks
    them (see ESMMParams.allow_unnested)."""

    Params = ESMMParams
    params: ESMMParams
    cascade = True  # outputs chain the tasks in spec order: training needs nested labels

    def build_layers(self):
        self.embedding = self.make_embedding()
        self.towers = Towers(self.schema.num_tasks, self.params.tower_units, dtype=self.dtype_policy, name="towers")

    def forward(self, features, training=None):
        x = self.flat_inputs(self.embedding(features, training=training), features)
        logits = self.towers(x)
        conditional = ops.sigmoid(ops.cast(logits, "float32"))  # p(task_k | task_{k-1})
        outputs, running = {}, None
        for i, task in enumerate(self.schema.tasks):
            running = conditional[:, i:i + 1] if running is None else running * conditional[:, i:i + 1]
            outputs[task] = running
        return outputs, Details(logits, extra={"conditional": conditional})


@dataclasses.dataclass(frozen=True)
class AITMParams(Params):
    """tower_units: each task tower's layers (the last is k, the width of p, q and z).
    calibrator_weight: the behavioural-expectation calibrator's weight (alpha; 0 turns it off).
    allow_unnested: as ESMM's (train on labels that are not nested, with one warning line)."""

    tower_units: tuple[int, ...] = (128, 64, 32)
    calibrator_weight: float = 0.6
    allow_unnested: bool = False

    def validate(self, model):
        super().validate(model)
        if self.calibrator_weight < 0:
            raise ConfigError(f"{model}: calibrator_weight must be >= 0, got {self.calibrator_weight}")


@register
class AITM(MDMTModel):
    """Adaptive information transfer multi-task model (see the module doc)."""

    Params = AITMParams
    params: AITMParams
    cascade = True  # the calibrator assumes the funnel: training needs nested labels

    def build_layers(self):
        p, t = self.params, self.schema.num_tasks
        if t < 2:
            raise ConfigError(f"{self.name}: AITM transfers information between tasks; the spec has {t} task(s)")
        k = p.tower_units[-1]
        self.embedding = self.make_embedding()
        self.towers = ExpertGroup(t, p.tower_units, dtype=self.dtype_policy, name="towers")  # q_t: [B, T, k]

        def dense(units, name, activation=None):
            return layers.Dense(units, activation=activation, dtype=self.dtype_policy, name=name)

        self.transfer = [dense(k, f"transfer_{i}", "relu") for i in range(1, t)]
        self.h1 = [dense(k, f"ait_h1_{i}") for i in range(1, t)]
        self.h2 = [dense(k, f"ait_h2_{i}") for i in range(1, t)]
        self.h3 = [dense(k, f"ait_h3_{i}") for i in range(1, t)]
        self.heads = [dense(1, f"head_{i}") for i in range(t)]

    def _ait(self, i, p, q):
        """AIT for task i + 1: (z, the weight of the transferred p) from p, q [B, k]."""
        candidates = ops.stack([p, q], axis=1)  # [B, 2, k]
        scores = ops.sum(self.h1[i](candidates) * self.h2[i](candidates), axis=-1)
        weights = ops.softmax(scores / math.sqrt(candidates.shape[-1]), axis=-1)  # [B, 2]
        z = ops.sum(weights[:, :, None] * self.h3[i](candidates), axis=1)
        return z, weights[:, 0]

    def forward(self, features, training=None):
        x = self.flat_inputs(self.embedding(features, training=training), features)
        q = self.towers(x)
        z, transferred, logits = q[:, 0], [], [self.heads[0](q[:, 0])]
        for i in range(1, self.schema.num_tasks):
            z, weight = self._ait(i - 1, self.transfer[i - 1](z), q[:, i])
            transferred.append(weight)
            logits.append(self.heads[i](z))
        logits = ops.concatenate(logits, axis=1)  # [B, T]
        outputs = self.probabilities(logits)
        if training and self.params.calibrator_weight:
            probs = ops.sigmoid(ops.cast(logits, "float32"))
            excess = ops.relu(probs[:, 1:] - probs[:, :-1])  # a later step likelier than the one before
            self.add_loss(self.params.calibrator_weight * ops.mean(ops.sum(excess, axis=1)))
        return outputs, Details(logits, extra={"transfer_weight": ops.stack(transferred, axis=1)})
