"""MUSENet: implicit scenarios learned from the data (Jin et al., WSDM 2023; seed 002's
"MUSENET": "to mine and model implicit scenarios").

A Scenario Learning Module projects each sample's scenario-sensitive features into a
scenario space, s = f_omega(x) (an MLP whose last layer is linear), and softly assigns it
to K learned scenario prototypes Lambda = {c_1, ..., c_K} (seed 002, verified):

    pi_k = Q(c_k | x) = exp(-d(s, c_k) / temperature) / sum_k' exp(-d(s, c_k') / temperature)

The seed writes d without defining it, and no temperature. Ours: d the squared Euclidean
distance between s and c_k scaled to unit length, d = 2 - 2 cos(s, c_k) (a
similarity over a temperature; distance="euclidean" uses the raw vectors), temperature 0.3.
Raw Euclidean distances with N(0, 1) prototypes sent every sample of the synthetic set to
the prototype nearest the origin, for good (k-means' dead clusters); on the unit sphere,
with orthogonal initial prototypes, no prototype wins by its norm. Training draws the hard
assignment with the Gumbel-softmax trick (seed 002, verified):

    a_k = softmax_k((log pi_k + g_k) / gumbel_tau),   g_k ~ Gumbel(0, 1)

and uses it straight-through: the forward value is one_hot(argmax_k a_k), the gradient
that of the soft a (so f_omega and the prototypes learn from the prediction loss). At
inference there is no noise: one_hot(argmax_k pi_k), deterministic
(`inference_assignment="soft"` uses pi itself instead). The prototypes also minimise the
expected distance of the samples to them (seed 002: "given omega, the objective is to
minimize the distance expectation from each data sample to the corresponding scenario
prototypes"), an EM-like M-step added as a loss in training:

    L_proto = prototype_weight * mean_i sum_k sg(pi_ik) d(sg(s_i), c_k)

(sg = stop_gradient: "given omega", it moves the prototypes only, so it cannot collapse
f_omega). The prediction: a shared MLP over every input and one MLP expert per implicit
scenario combined by the assignment, h = [shared(x) ; sum_k a_k E_k(x)], then a tower per
task on h.

Explicit domains: the paper learns scenarios because explicit ones may be missing. In
mdmt_tf the domain id is always there, so the implicit scenarios COMPLEMENT it: the
domain is an embedded field like any other, read by the shared network, the experts and
(unless `scenario_fields` leaves it out) f_omega, so an implicit scenario may coincide
with a domain, split one, or span several.

Left out: the paper's repeat-aware mechanism (repurchase intentions within each scenario,
from a user's history; mdmt_tf has no behaviour sequences) and its causally motivated
design against overfitting to some scenarios (named in its abstract, not in the seed).

Defaults: K = 4, the widths, the cosine distance, temperature = 0.3, gumbel_tau = 1,
prototype_weight = 1 and the orthogonal prototype initialisation are our choices (the
seed gives none of them; on the synthetic set, temperature 1 left the initial posterior
near uniform, mean max 0.44 for K = 4, and 0.1 nearly one-hot).
"""
from __future__ import annotations

import dataclasses

import keras
from keras import ops

from mdmt_tf.errors import ConfigError
from mdmt_tf.layers import MLP, ExpertGroup, Towers, mix
from mdmt_tf.layers._util import check_positive_int, register
from mdmt_tf.models.base import MDMTModel
from mdmt_tf.models.details import Details, Gate
from mdmt_tf.models.params import Params

_TINY = 1e-20  # keeps the Gumbel noise's logarithms finite


def _unit(v):
    return v * ops.rsqrt(ops.maximum(ops.sum(ops.square(v), axis=-1, keepdims=True), 1e-12))


def gumbel_noise(shape, seed):
    """Gumbel(0, 1) samples, -log(-log(u)) with u ~ U(0, 1), float32."""
    u = keras.random.uniform(shape, dtype="float32", seed=seed)
    return -ops.log(-ops.log(u + _TINY) + _TINY)


def straight_through_gumbel(log_pi, noise, tau):
    """Hard Gumbel-softmax: the forward value is one_hot(argmax(log_pi + noise)), the gradient
    that of softmax((log_pi + noise) / tau). log_pi, noise [B, K] float32 -> [B, K]."""
    perturbed = log_pi + noise
    soft = ops.softmax(perturbed / tau, axis=-1)
    hard = ops.one_hot(ops.argmax(perturbed, axis=-1), perturbed.shape[-1], dtype=soft.dtype)
    return soft + ops.stop_gradient(hard - soft)


@register
class ScenarioAssignment(keras.layers.Layer):
    """K learned scenario prototypes [K, dim] and the assignment of samples to them.

    call(s [B, dim], training) -> (assignment [B, K], posterior pi [B, K]), both float32
    whatever the compute dtype, each row summing to 1. assignment: training, the
    straight-through hard Gumbel-softmax sample; inference, one_hot(argmax pi) ("hard") or
    pi ("soft"). In training, with prototype_weight > 0, adds the prototypes' expected
    distance loss (see the module doc).
    """

    INFERENCE = ("hard", "soft")
    DISTANCES = ("cosine", "euclidean")

    def __init__(self, num_scenarios, dim, temperature=0.3, gumbel_tau=1.0, inference="hard", distance="cosine",
                 prototype_weight=1.0, prototype_initializer=None, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.num_scenarios = check_positive_int(num_scenarios, "num_scenarios", "ScenarioAssignment", minimum=2)
        self.dim = check_positive_int(dim, "dim", "ScenarioAssignment")
        self.temperature, self.gumbel_tau = float(temperature), float(gumbel_tau)
        self.prototype_weight = float(prototype_weight)
        if self.temperature <= 0 or self.gumbel_tau <= 0:
            raise ValueError(f"ScenarioAssignment: `temperature` and `gumbel_tau` must be > 0, received "
                             f"temperature={temperature!r}, gumbel_tau={gumbel_tau!r}")
        if self.prototype_weight < 0:
            raise ValueError(f"ScenarioAssignment: `prototype_weight` must be >= 0, received {prototype_weight!r}")
        if inference not in self.INFERENCE:
            raise ValueError(f"ScenarioAssignment: `inference` must be one of {list(self.INFERENCE)}, "
                             f"received {inference!r}")
        self.inference = inference
        if distance not in self.DISTANCES:
            raise ValueError(f"ScenarioAssignment: `distance` must be one of {list(self.DISTANCES)}, "
                             f"received {distance!r}")
        self.distance = distance
        self.prototype_initializer = keras.initializers.get(
            prototype_initializer or keras.initializers.Orthogonal())
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def build(self, input_shape=None):
        # float32 and read as float32 under a mixed policy: the assignment is computed in float32
        self.prototypes = self.add_weight(name="prototypes", shape=(self.num_scenarios, self.dim),
                                          initializer=self.prototype_initializer, dtype="float32", autocast=False)

    def distances(self, s):
        """Squared Euclidean distances [B, K] (float32) of s [B, dim] to the prototypes, both
        first scaled to unit length with distance="cosine" (then d = 2 - 2 cos(s, c))."""
        s = ops.cast(s, "float32")
        c = ops.convert_to_tensor(self.prototypes)
        if self.distance == "cosine":
            s, c = _unit(s), _unit(c)
        return ops.sum(ops.square(s[:, None, :] - c[None, :, :]), axis=-1)

    def call(self, s, training=None):
        d = self.distances(s)
        log_pi = ops.log_softmax(-d / self.temperature, axis=-1)
        posterior = ops.exp(log_pi)
        if training:
            noise = gumbel_noise(ops.shape(log_pi), self.seed_generator)
            assignment = straight_through_gumbel(log_pi, noise, self.gumbel_tau)
            if self.prototype_weight:
                held = self.distances(ops.stop_gradient(ops.cast(s, "float32")))
                self.add_loss(self.prototype_weight
                              * ops.mean(ops.sum(ops.stop_gradient(posterior) * held, axis=-1)))
        elif self.inference == "hard":
            assignment = ops.one_hot(ops.argmax(log_pi, axis=-1), self.num_scenarios, dtype="float32")
        else:
            assignment = posterior
        return assignment, posterior

    def compute_output_shape(self, input_shape):
        shape = (input_shape[0], self.num_scenarios)
        return shape, shape

    def get_config(self):
        return {**super().get_config(), "num_scenarios": self.num_scenarios, "dim": self.dim,
                "temperature": self.temperature, "gumbel_tau": self.gumbel_tau, "inference": self.inference,
                "distance": self.distance,
                "prototype_weight": self.prototype_weight, "seed": self.seed,
                "prototype_initializer": keras.initializers.serialize(self.prototype_initializer)}


@dataclasses.dataclass(frozen=True)
class MUSENetParams(Params):
    """num_scenarios: K, the implicit scenarios (prototypes and scenario experts); >= 2.
    scenario_fields: the scenario-sensitive features f_omega reads: embedded fields (the
      domain field, sparse fields) and dense features by name; empty = every input.
    scenario_units: f_omega's layers; the last, linear, is the scenario space's dimension.
    distance: "cosine" (squared distance of the unit-length s and c, 2 - 2 cos) or
      "euclidean" (of the raw vectors).
    temperature: divides the distances in the soft assignment pi (> 0).
    gumbel_tau: the Gumbel-softmax temperature (> 0); it shapes the straight-through
      gradient only (the hard forward value is the argmax whatever tau).
    inference_assignment: "hard" (one_hot(argmax pi), deterministic) or "soft" (pi).
    prototype_weight: weight of the prototypes' expected-distance loss (0 turns it off).
    expert_units: each scenario expert's layers. shared_units: the shared network's.
    tower_units: each task tower's hidden layers (empty: a linear head)."""

    num_scenarios: int = 4
    scenario_fields: tuple[str, ...] = ()
    scenario_units: tuple[int, ...] = (64, 16)
    temperature: float = 0.3
    gumbel_tau: float = 1.0
    inference_assignment: str = "hard"
    distance: str = "cosine"
    prototype_weight: float = 1.0
    expert_units: tuple[int, ...] = (256, 64)
    shared_units: tuple[int, ...] = (256, 64)
    tower_units: tuple[int, ...] = (64,)

    CHOICES = {"inference_assignment": ScenarioAssignment.INFERENCE, "distance": ScenarioAssignment.DISTANCES}
    MAY_BE_EMPTY = Params.MAY_BE_EMPTY | {"scenario_fields", "tower_units"}

    def validate(self, model):
        if self.num_scenarios < 2:
            raise ConfigError(f"{model}: num_scenarios must be >= 2 (the implicit scenarios samples are "
                              f"assigned to), got {self.num_scenarios}")
        super().validate(model)
        for name in ("temperature", "gumbel_tau"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{model}: {name} must be > 0, got {getattr(self, name)}")
        if self.prototype_weight < 0:
            raise ConfigError(f"{model}: prototype_weight must be >= 0, got {self.prototype_weight}")


@register
class MUSENet(MDMTModel):
    """Multi-scenario learning with implicit scenarios (see the module doc).

    Details: gate "scenarios" [B, 1, K], the assignment the pass used (one-hot at
    inference by default: which implicit scenario each sample falls in); extra
    "scenario_posterior" [B, K], the soft assignment pi."""

    Params = MUSENetParams
    params: MUSENetParams

    def build_layers(self):
        p, s = self.params, self.schema
        self.embedding = self.make_embedding()
        valid = self.embedding.fields + s.dense
        unknown = [f for f in p.scenario_fields if f not in valid]
        if unknown:
            raise ConfigError(f"{self.name}: scenario_fields {unknown} are not features; valid: {list(valid)}")
        self.scenario_net = MLP(p.scenario_units, activate_last=False, dtype=self.dtype_policy, name="scenario_net")
        self.assign = ScenarioAssignment(p.num_scenarios, p.scenario_units[-1], temperature=p.temperature,
                                         gumbel_tau=p.gumbel_tau, inference=p.inference_assignment, distance=p.distance,
                                         prototype_weight=p.prototype_weight, dtype=self.dtype_policy,
                                         name="scenarios")
        self.experts = ExpertGroup(p.num_scenarios, p.expert_units, dtype=self.dtype_policy, name="scenario_experts")
        self.shared = MLP(p.shared_units, dropout=p.dropout, dtype=self.dtype_policy, name="shared")
        self.towers = Towers(s.num_tasks, p.tower_units, dtype=self.dtype_policy, name="towers")

    def scenario_inputs(self, embedded, features, x):
        """What f_omega reads: the scenario fields' embeddings and dense values, or all of x."""
        fields = self.params.scenario_fields
        if not fields:
            return x
        position = {f: i for i, f in enumerate(self.embedding.fields)}
        pieces = [embedded[:, position[f]] if f in position else ops.cast(features[f], x.dtype)[:, None]
                  for f in fields]
        return ops.concatenate(pieces, axis=1)

    def forward(self, features, training=None):
        embedded = self.embedding(features, training=training)
        x = self.flat_inputs(embedded, features)
        scenario = self.scenario_net(self.scenario_inputs(embedded, features, x), training=training)
        assignment, posterior = self.assign(scenario, training=training)  # [B, K] each
        specific = mix(assignment[:, None, :], self.experts(x))[:, 0]  # sum_k a_k E_k(x)
        h = ops.concatenate([self.shared(x, training=training), specific], axis=-1)
        logits = self.towers(h)
        details = Details(logits, gates=(Gate("scenarios", assignment[:, None, :]),),
                          extra={"scenario_posterior": posterior})
        return self.probabilities(logits), details
