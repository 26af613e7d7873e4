"""Cascade models: ESMM (with ESCM²'s counterfactual regularisers) and AITM.

ESMM and ESCM²: see the class doc.

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

EPSILON = 1e-7  # as mdmt_tf.training.losses.bce's clip


@dataclasses.dataclass(frozen=True)
class ESMMParams(Params):
    """tower_units: each task tower's hidden layers.
    allow_unnested: train even if the training labels are not nested (some row positive
      for task k but not for task k-1, e.g. like=1 with click=0); by default that stops
      training with an error naming the first such row (mdmt_tf.data.checks). When true,
      one line on stderr counts those rows, and the outputs are then not the cascade's
      probabilities.
    counterfactual: ESCM²'s regulariser on the conditional towers (the `escm2` model is
      "dr"): "none" (ESMM), "ips" or "dr" -- see ESMM's doc.
    counterfactual_weight: its weight lambda_c (0.5, the weight of the authors' released
      PaddleRec configuration).
    propensity_clip: the propensity's lower bound (0.05, my choice: the paper clips but the
      seed text gives no value); 1/clip bounds an inverse-propensity weight (20)."""

    tower_units: tuple[int, ...] = (128, 64)
    allow_unnested: bool = False
    counterfactual: str = "none"
    counterfactual_weight: float = 0.5
    propensity_clip: float = 0.05
    CHOICES = {"counterfactual": ("none", "ips", "dr")}

    def validate(self, model):
        super().validate(model)
        if self.counterfactual_weight < 0:
            raise ConfigError(f"{model}: counterfactual_weight must be >= 0, got {self.counterfactual_weight}")
        if not 0 < self.propensity_clip <= 1:
            raise ConfigError(f"{model}: propensity_clip must be in (0, 1], got {self.propensity_clip}")


def _domain_means(values, domain, num_domains):
    """sum_d mean_{i in domain d} values_i (values [B]): how the trainer's default "pair"
    reduction weighs the domains; a domain absent from the batch adds 0."""
    onehot = ops.one_hot(ops.cast(domain, "int32"), num_domains, dtype="float32")  # [B, D]
    counts = ops.maximum(ops.sum(onehot, axis=0), 1.0)
    return ops.sum(ops.sum(onehot * values[:, None], axis=0) / counts)


def _cross_entropy(target, p):
    """Element-wise cross-entropy of probability p against a (soft) target, p clipped."""
    p = ops.clip(p, EPSILON, 1.0 - EPSILON)
    return -(target * ops.log(p) + (1.0 - target) * ops.log(1.0 - p))


@register
class ESMM(MDMTModel):
    """Entire space multi-task model (Ma et al., SIGIR 2018) as a cascade over the tasks in
    spec order: p(task_0) = sigmoid(l_0) and p(task_k) = p(task_{k-1}) * sigmoid(l_k), e.g.
    p(like) = p(click) * p(like | click). Every output is trained on the entire space.
    That is a likelihood only for nested labels (every like is a click): training checks
    them (see ESMMParams.allow_unnested).

    ESCM² (Wang et al., SIGIR 2022; counterfactual="ips"|"dr", the `escm2` model with "dr")
    adds a counterfactual regulariser on each conditional tower c_k = p(task_k | task_{k-1}),
    k >= 1: the rows exposed to step k are those with y_{k-1} = 1 (o_i), seen with the
    propensity phat_i = clip(stop_gradient(p(task_{k-1})_i), propensity_clip, 1). With
    e_i = CE(y_k, c_k):

        IPS:  L_k = mean_i o_i e_i / phat_i
        DR:   L_k = mean_i [ ehat_i + o_i (e_i - ehat_i) / phat_i ]
                    + mean_i o_i (stop_gradient(e_i) - ehat'_i)^2 / phat_i

    where an imputation tower per step predicts the conditional label ytil_i; the imputed
    error ehat_i = CE(stop_gradient(ytil_i), c_k) trains the conditional tower and
    ehat'_i = CE(ytil_i, stop_gradient(c_k)) the imputation tower (the second term, the
    doubly robust joint learning's imputation loss). Means are taken within each domain and
    summed, as the trainer's loss. The regulariser, times counterfactual_weight, joins the
    model's losses in training passes that receive the labels (MDMTModel.label_loss); the
    entire-space CTR and CTCVR losses are the trainer's, weighted by --task-weights."""

    Params = ESMMParams
    params: ESMMParams
    cascade = True  # outputs chain the tasks in spec order: training needs nested labels

    def build_layers(self):
        t = self.schema.num_tasks
        if self.params.counterfactual != "none" and t < 2:
            raise ConfigError(f"{self.name}: counterfactual={self.params.counterfactual!r} regularises the "
                              f"conditional towers of a funnel of >= 2 tasks; the spec has {t}")
        self.embedding = self.make_embedding()
        self.towers = Towers(t, self.params.tower_units, dtype=self.dtype_policy, name="towers")
        if self.params.counterfactual == "dr":
            self.imputation = Towers(t - 1, self.params.tower_units, dtype=self.dtype_policy, name="imputation")

    def forward(self, features, training=None):
        x = self.flat_inputs(self.embedding(features, training=training), features)
        logits = self.towers(x)
        conditional = ops.sigmoid(ops.cast(logits, "float32"))  # p(task_k | task_{k-1})
        outputs, running = {}, None
        for i, task in enumerate(self.schema.tasks):
            running = conditional[:, i:i + 1] if running is None else running * conditional[:, i:i + 1]
            outputs[task] = running
        extra = {"conditional": conditional}
        if self.params.counterfactual == "dr":  # the imputed conditional labels of steps 1..T-1
            extra["imputed"] = ops.sigmoid(ops.cast(self.imputation(x), "float32"))
        return outputs, Details(logits, extra=extra)

    def label_loss(self, features, labels, outputs, details):
        p = self.params
        if p.counterfactual == "none" or not p.counterfactual_weight:
            return None
        tasks, total = self.schema.tasks, 0.0
        domain = self.domain_index(features)
        for k in range(1, len(tasks)):
            exposed = ops.reshape(ops.cast(labels[tasks[k - 1]], "float32"), (-1,))  # o_i
            target = ops.reshape(ops.cast(labels[tasks[k]], "float32"), (-1,))
            propensity = ops.clip(ops.stop_gradient(ops.reshape(outputs[tasks[k - 1]], (-1,))),
                                  p.propensity_clip, 1.0)
            c = details.extra["conditional"][:, k]
            error = _cross_entropy(target, c)
            if p.counterfactual == "ips":
                term = exposed * error / propensity
            else:
                imputed = details.extra["imputed"][:, k - 1]
                for_tower = _cross_entropy(ops.stop_gradient(imputed), c)
                for_imputation = _cross_entropy(imputed, ops.stop_gradient(c))
                term = (for_tower + exposed * (error - for_tower) / propensity
                        + exposed * ops.square(ops.stop_gradient(error) - for_imputation) / propensity)
            total = total + _domain_means(term, domain, self.schema.num_domains)
        return p.counterfactual_weight * total


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
