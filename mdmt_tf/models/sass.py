"""SASS: the scenario-adaptive and self-supervised model (Zhang et al., CIKM 2022, Alibaba;
seed 002's "SASS"), trained in its two stages: contrastive pre-training, then fine-tuning.

Multi-Layer Scenario Adaptive Transfer (ML-SAT). Write x for a sample's flattened
embeddings (its sparse fields, the domain excluded, and its dense features) and d for a
scenario (a domain). Three parts, each of L layers (`num_sat_layers`) of H units
(`sat_units`):

  global shared network (every scenario's samples):  g_0 = x,  g_l = relu(W_g^l g_{l-1} + b_g^l)
  scenario modeling:                                  a_d = relu(W_a x_a(d) + b_a)
  scenario-specific network of scenario d:            s_0 = tanh(W_s^d x + b_s^d), then for l = 1..L
                                                      the scenario-adaptive gate unit (SAGU):

      r_l = sigmoid(W_r^{l,d} [g_l, s_{l-1}] + W_br a_d)        adaptive gate
      h_l = tanh(W_h^{l,d} [r_l * g_l, s_{l-1}])               candidate
      z_l = sigmoid(W_z^{l,d} [g_l, s_{l-1}] + W_bz a_d)        update gate
      s_l = (1 - z_l) * s_{l-1} + z_l * h_l

  scenario bias fusion:   alpha = sigmoid(W_0 [s_L, a_d]),  e_s = alpha * s_L + (1 - alpha) * a_d

x_a(d) is scenario d's embedding (the domain's own table). The global network is the same
for every scenario (the domain is not among its inputs); the scenario-specific network has
its own weights per scenario (W_s^d, W_r^{l,d}, W_h^{l,d}, W_z^{l,d}); W_br, W_bz (one for
every layer, as the paper writes them) and W_0 are shared, the scenario entering through
a_d. The gates r, z and the fusion alpha are element-wise (H units). The task logits are
towers (`tower_units`, one per task, shared by the scenarios) over the sample's e_s under
its own scenario. ML-SAT is computed for every scenario at once ([B, D, H]: every kernel a
stack over scenarios, one einsum per layer) and each sample's own scenario selected by a
one-hot product, so other scenarios' weights get zero gradient from it.

Stage 0, "pretrain" (the first `pretrain_epochs` epochs): self-supervised only. The two
views of sample i are its representation e_s under its own scenario d_i and under another
scenario d'_i (`pair_scenario`: "random", uniform over the other D - 1 scenarios, drawn
anew at every training pass; or "next", (d_i + 1) mod D); with the 2N views of a batch of
N, z = normalised views and sim the cosine similarity, the NT-Xent loss

    L_ij = -log( exp(sim(e^i, e^j) / tau) / sum_{k=1..2N, k != i} exp(sim(e^i, e^k) / tau) )

averaged over the 2N anchors (each view's positive is the sample's other view, the 2N - 2
other views are its negatives; `temperature` tau). It is added with add_loss in training
passes. The trainer optimises only that loss in this stage (MDMTModel.supervised_in_stage
is False: the supervised BCE is reported, never optimised) and only the embeddings and
ML-SAT (`trainable_in_stage`): the towers and their optimizer slots do not move.
Stage 1, "finetune" (every later epoch): everything is trained with the supervised loss,
from the pre-trained embeddings and ML-SAT, plus `finetune_contrastive_weight` times the
contrastive loss (0 by default: the paper fine-tunes on the labelled task alone).
`pretrain_epochs` 0 trains the fine-tune stage from the first epoch (the paper's SASS-Base,
without pre-training).

Adaptation to mdmt_tf. The paper has a user tower and an item tower, each with its own
ML-SAT, scored by their inner product, and pre-training aligns the same user's (item's)
representations built from its behaviour in two scenarios. mdmt_tf's models score a
sample from one feature set, whose schema does not say which fields describe the user and
which the item: one ML-SAT over all fields, and the positive pair is the same sample
represented under two scenarios (its scenario replaced: scenario embedding, scenario
modeling and scenario-specific weights), the other samples of the batch the negatives.
The pre-training reads the training batches (the paper's unlabelled "entire space"
exposures are not a separate stream here). Under a distribution strategy each replica
contrasts its own share of the batch.

Defaults. From the seed: the SAGU, scenario modeling and fusion equations; the NT-Xent
loss with a temperature; two stages (pre-train, fine-tune). My choices (the seed gives no
values): sat_units 64, num_sat_layers 3, tower_units (64,), relu for f (scenario modeling)
and the global network, tanh for s_0 (the range of the GRU-like state), no bias in the
gates (the W_b* a terms are their scenario bias), element-wise alpha, temperature 0.1,
pretrain_epochs 2, pair_scenario "random", finetune_contrastive_weight 0.0 (my reading of
the paper: fine-tuning uses the supervised loss only). `dropout` applies after each layer
of the global network.

A schema with a single domain cannot form cross-scenario pairs: the model refuses it
unless no contrastive loss is used (pretrain_epochs 0 and finetune_contrastive_weight 0).
"""
from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf
from keras import ops

from mdmt_tf.errors import ConfigError
from mdmt_tf.layers import GroupedGlorotUniform, Towers
from mdmt_tf.layers._util import check_positive_int, register, select_by_domain
from mdmt_tf.models.base import MDMTModel
from mdmt_tf.models.details import Details
from mdmt_tf.models.params import Params


def nt_xent(a, b, temperature: float):
    """The NT-Xent (SimCLR) loss of N positive pairs (a_i, b_i), a and b [N, H], in float32:
    the mean over the 2N views of -log softmax over the 2N - 1 other views of the cosine
    similarity / temperature, taken at the view's pair. 0 for an empty batch."""
    views = ops.cast(ops.concatenate([a, b], axis=0), "float32")  # [2N, H]
    views = views / ops.sqrt(ops.maximum(ops.sum(ops.square(views), axis=1, keepdims=True), 1e-12))
    sim = ops.matmul(views, ops.transpose(views)) / temperature  # [2N, 2N]
    n, m = ops.shape(a)[0], ops.shape(views)[0]
    index = ops.arange(m, dtype="int32")
    others = sim - 1e9 * ops.cast(ops.equal(index[:, None], index[None, :]), "float32")  # k != i
    partner = ops.concatenate([views[n:], views[:n]], axis=0)  # view i's pair: i + N, or i - N
    positive = ops.sum(views * partner, axis=1) / temperature
    return ops.sum(ops.logsumexp(others, axis=1) - positive) / ops.maximum(ops.cast(m, "float32"), 1.0)


@register
class ScenarioAdaptiveTransfer(keras.layers.Layer):
    """ML-SAT (see the module doc) for every scenario at once.

    call(x [B, n_in], scenario [D, k] (each scenario's embedding x_a), training) ->
    (e_s [B, D, H], alpha [B, D, H], r [B, D, L, H], z [B, D, L, H]): scenario d's
    representation of every sample, the fusion weight and each layer's adaptive and update
    gates.
    """

    def __init__(self, num_domains, units=64, num_layers=3, dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        self.num_domains = check_positive_int(num_domains, "num_domains", "ScenarioAdaptiveTransfer")
        self.units = check_positive_int(units, "units", "ScenarioAdaptiveTransfer")
        self.num_layers = check_positive_int(num_layers, "num_layers", "ScenarioAdaptiveTransfer")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"ScenarioAdaptiveTransfer: `dropout` must be in [0, 1), received dropout={dropout!r}")
        self.dropout_rate = float(dropout)
        self.global_layers = [keras.layers.Dense(self.units, activation="relu", dtype=self.dtype_policy,
                                                 name=f"global_{i}") for i in range(self.num_layers)]
        self.dropout_layer = (keras.layers.Dropout(self.dropout_rate, dtype=self.dtype_policy)
                              if self.dropout_rate else None)

    def build(self, x_shape, scenario_shape):
        d, h = self.num_domains, self.units
        n_in, k = int(x_shape[-1]), int(scenario_shape[-1])
        shape = (n_in,)
        for layer in self.global_layers:
            layer.build((None,) + shape)
            shape = (h,)

        def stacked(name, fan_in):  # one kernel per scenario
            return self.add_weight(name=name, shape=(d, fan_in, h), initializer=GroupedGlorotUniform())

        def shared(name, fan_in):
            return self.add_weight(name=name, shape=(fan_in, h), initializer="glorot_uniform")

        self.scenario_kernel = shared("scenario_kernel", k)  # W_a
        self.scenario_bias = self.add_weight(name="scenario_bias", shape=(h,), initializer="zeros")  # b_a
        self.initial_kernel = stacked("initial_kernel", n_in)  # W_s^d
        self.initial_bias = self.add_weight(name="initial_bias", shape=(d, h), initializer="zeros")
        self.adaptive_kernels = [stacked(f"adaptive_kernel_{i}", 2 * h) for i in range(self.num_layers)]  # W_r
        self.candidate_kernels = [stacked(f"candidate_kernel_{i}", 2 * h) for i in range(self.num_layers)]  # W_h
        self.update_kernels = [stacked(f"update_kernel_{i}", 2 * h) for i in range(self.num_layers)]  # W_z
        self.adaptive_scenario_kernel = shared("adaptive_scenario_kernel", h)  # W_br
        self.update_scenario_kernel = shared("update_scenario_kernel", h)  # W_bz
        self.fusion_kernel = shared("fusion_kernel", 2 * h)  # W_0

    def call(self, x, scenario, training=None):
        d = self.num_domains
        a = ops.relu(ops.matmul(scenario, self.scenario_kernel) + self.scenario_bias)  # [D, H]
        s = ops.tanh(ops.einsum("bi,dio->bdo", x, self.initial_kernel) + self.initial_bias)  # [B, D, H]
        batch = ops.shape(s)[0]
        g, adaptive, update = x, [], []
        for i, layer in enumerate(self.global_layers):
            g = layer(g)
            if self.dropout_layer is not None:
                g = self.dropout_layer(g, training=training)
            gd = ops.broadcast_to(g[:, None, :], (batch, d, self.units))
            both = ops.concatenate([gd, s], axis=-1)  # [g_l, s_{l-1}]
            r = ops.sigmoid(ops.einsum("bdi,dio->bdo", both, self.adaptive_kernels[i])
                            + ops.matmul(a, self.adaptive_scenario_kernel))
            h = ops.tanh(ops.einsum("bdi,dio->bdo", ops.concatenate([r * gd, s], axis=-1), self.candidate_kernels[i]))
            z = ops.sigmoid(ops.einsum("bdi,dio->bdo", both, self.update_kernels[i])
                            + ops.matmul(a, self.update_scenario_kernel))
            s = (1.0 - z) * s + z * h
            adaptive.append(r)
            update.append(z)
        ad = ops.broadcast_to(a[None], (batch, d, self.units))
        alpha = ops.sigmoid(ops.einsum("bdi,io->bdo", ops.concatenate([s, ad], axis=-1), self.fusion_kernel))
        e = alpha * s + (1.0 - alpha) * ad
        return e, alpha, ops.stack(adaptive, axis=2), ops.stack(update, axis=2)

    def get_config(self):
        return {**super().get_config(), "num_domains": self.num_domains, "units": self.units,
                "num_layers": self.num_layers, "dropout": self.dropout_rate}


@dataclasses.dataclass(frozen=True)
class SASSParams(Params):
    """sat_units: H, the width of every ML-SAT layer (global network, scenario state s_l,
      scenario representation a, e_s).
    num_sat_layers: L, the layers of the global network and of the scenario-specific one
      (one SAGU each).
    tower_units: hidden widths of each task's tower over e_s ([] = a linear logit).
    pretrain_epochs: epochs of the contrastive pre-training stage (0: no pre-training,
      the paper's SASS-Base); fine-tuning trains every later epoch.
    temperature: tau of the NT-Xent loss.
    pair_scenario: the second view's scenario: "random" (one of the other scenarios drawn
      at each training pass) or "next" ((d + 1) mod D).
    finetune_contrastive_weight: the contrastive loss's weight in the fine-tune stage."""

    sat_units: int = 64
    num_sat_layers: int = 3
    tower_units: tuple[int, ...] = (64,)
    pretrain_epochs: int = 2
    temperature: float = 0.1
    pair_scenario: str = "random"
    finetune_contrastive_weight: float = 0.0
    CHOICES = {"pair_scenario": ("random", "next")}
    MAY_BE_EMPTY = frozenset({"oov_fields", "tower_units"})

    def validate(self, model):
        super().validate(model)
        if self.sat_units < 1:
            raise ConfigError(f"{model}: sat_units must be >= 1, got {self.sat_units}")
        if self.pretrain_epochs < 0:
            raise ConfigError(f"{model}: pretrain_epochs (the contrastive pre-training's epochs) must be >= 0, "
                              f"got {self.pretrain_epochs}")
        if not self.temperature > 0:
            raise ConfigError(f"{model}: temperature must be > 0, got {self.temperature}")
        if self.finetune_contrastive_weight < 0:
            raise ConfigError(f"{model}: finetune_contrastive_weight must be >= 0, "
                              f"got {self.finetune_contrastive_weight}")


@register
class SASS(MDMTModel):
    """Scenario-adaptive and self-supervised model: ML-SAT, contrastive pre-training, then
    fine-tuning (see the module doc)."""

    Params = SASSParams
    params: SASSParams
    stages = ("pretrain", "finetune")

    def build_layers(self):
        p, d = self.params, self.schema.num_domains
        self.contrastive = p.pretrain_epochs > 0 or p.finetune_contrastive_weight > 0
        if self.contrastive and d < 2:
            raise ConfigError(f"{self.name}: the contrastive loss pairs a sample's representations under two "
                              f"scenarios; the schema has 1 domain ({self.schema.domains[0]!r}). Use a schema of "
                              ">= 2 domains, or pretrain_epochs 0 and finetune_contrastive_weight 0 (no "
                              f"contrastive loss), got pretrain_epochs {p.pretrain_epochs} and "
                              f"finetune_contrastive_weight {p.finetune_contrastive_weight}")
        self.embedding = self.make_embedding(with_domain=False)
        self.scenario_embedding = self.make_embedding("scenario_embedding", fields=(self.schema.domain,))
        self.sat = ScenarioAdaptiveTransfer(d, p.sat_units, p.num_sat_layers, dropout=p.dropout,
                                            dtype=self.dtype_policy, name="ml_sat")
        self.towers = Towers(self.schema.num_tasks, p.tower_units, dtype=self.dtype_policy, name="towers")
        self.pair_seed = keras.random.SeedGenerator(name="pair_seed")

    # ------------------------------------------------------------ stages
    def stage_of_epoch(self, epoch: int) -> int:
        return 0 if epoch < self.params.pretrain_epochs else 1

    def trainable_in_stage(self, stage: int) -> list:
        """Pre-training: the embeddings and ML-SAT (not the towers); fine-tuning: everything."""
        if stage >= 1:
            return list(self.trainable_variables)
        towers = {id(v) for v in self.towers.trainable_variables}
        return [v for v in self.trainable_variables if id(v) not in towers]

    def supervised_in_stage(self, stage: int) -> bool:
        return stage >= 1

    # ------------------------------------------------------------ forward
    def representations(self, features, training=None):
        """ML-SAT of a batch under every scenario: (e_s, alpha, r, z) as ScenarioAdaptiveTransfer."""
        d = self.schema.num_domains
        x = self.flat_inputs(self.embedding(features, training=training), features)
        scenarios = self.scenario_embedding({self.schema.domain: ops.arange(d, dtype="int32")}, training=training)
        return self.sat(x, scenarios[:, 0, :], training=training)

    def other_scenario(self, domain):
        """The scenario of each sample's second view: another one than its own."""
        d = self.schema.num_domains
        if self.params.pair_scenario == "next":
            offset = ops.ones_like(domain)
        else:
            offset = keras.random.randint(ops.shape(domain), 1, d, dtype="int32", seed=self.pair_seed)
        return (domain + offset) % d

    def _may_be_pretraining(self) -> bool:
        """Whether a pass built now may run in the pre-training stage: False once the stage
        variable, read eagerly (tf.init_scope) when the pass is traced, is past it. A train
        function is traced anew at every stage change (MDMTTrainer.enter_epoch) and the stages
        never go back, so a fine-tune pass with finetune_contrastive_weight 0 skips the second
        view and the NT-Xent matrix; the loss's weight is still read from the variable in the
        graph, so a pass traced in pre-training and run later weighs it 0. True when the value
        is not known at trace time (a Keras stateless call: the graph then decides)."""
        with tf.init_scope():
            value = self.stage_variable.value
            return tf.is_symbolic_tensor(value) or int(ops.convert_to_numpy(value)) == 0

    def forward(self, features, training=None):
        p, d = self.params, self.schema.num_domains
        domain = self.domain_index(features)
        every, alpha, adaptive, update = self.representations(features, training=training)
        own = select_by_domain(every, domain, d)  # [B, H]: e_s under the sample's own scenario
        logits = self.towers(own)
        if training and self.contrastive and (p.finetune_contrastive_weight or self._may_be_pretraining()):
            other = select_by_domain(every, self.other_scenario(domain), d)
            weight = ops.where(ops.equal(self.stage_variable, 0), 1.0, p.finetune_contrastive_weight)
            self.add_loss(weight * nt_xent(own, other, p.temperature))
        extra = {"fusion_alpha": select_by_domain(alpha, domain, d),
                 "adaptive_gate": ops.mean(select_by_domain(adaptive, domain, d), axis=-1),
                 "update_gate": ops.mean(select_by_domain(update, domain, d), axis=-1)}
        return self.probabilities(logits), Details(logits, extra=extra)
