"""MAMDR (Luo et al., ICDE 2023): model-agnostic multi-domain learning.

Domain Negotiation (DN, Algorithm 1) trains the shared parameters theta alone, one outer
iteration:
    theta~ <- theta; shuffle the domains; for each domain i in that order train theta~ on
    domain i (see granularity); then theta <- theta + beta * (theta~ - theta)   (Reptile)

Domain Regularization (DR, Algorithm 2) trains domain-specific parameters theta_i (the
model of domain i is theta + theta_i): for each domain i, k other domains are sampled
(without replacement, independently for each i); for each sampled j:
    theta~_i <- theta_i; train theta~_i on domain j, then on domain i (the loss always at
    theta + theta~_i); theta_i <- theta_i + gamma * (theta~_i - theta_i)
DR never changes theta (nor the parameters without a domain-specific copy).

Strategies: "dn" (DN only), "dr" (theta trained by plain Adam steps at theta alone -- one
pass over every training row in mixed batches, or with "batch" granularity a batch of each
domain -- and theta_i by DR), "mamdr" (DN then DR every outer iteration, Algorithm 3). Domain-specific parameters
cover the dense weights (scope "dense") or every trainable variable (scope "all").
`dn_with_specific` runs DN's steps at theta~ + theta_d instead of theta~ (this module's
behaviour before it followed Algorithm 3). Serving uses theta + theta_d for each sample's
domain d (DomainSpecificModel).

Granularity, i.e. what "train on domain i" is:
  "pass"  (the official code): one full pass over domain i's training data (DR's pass over
          the target domain optionally capped at `dr_target_steps` batches); one outer
          iteration per epoch, so each domain weighs by its size.
  "batch" `inner_steps` steps on fresh batches of domain i; an epoch is
          rows // (batch_size * domains) outer iterations.
Every inner step uses a new batch. The steps share one optimizer (`inner_optimizer`, lr
`inner_lr`; Adam's state persists across phases, domains and epochs, as in the official
code); strategy "dr"'s plain steps use Adam(learning_rate).

Implementation: one Keras train_step is one inner step on one batch. A MAMDRSchedule
plans each epoch in Python with an RNG seeded by (seed, epoch) -- domain order, DR's
support domains, the rows of every batch -- and each batch carries a small control dict
(phase, domain, begin / end of a DN iteration or a DR update, ...) that the train_step
branches on. theta_d is one [num_domains, *shape] variable per domain-specific trainable
variable, an attribute of the trainer, so it is in the run's checkpoints (with the
optimizers' state and the model's RNG streams): restoring the best epoch restores its
theta_d, and a resumed run continues from the saved state with the schedule (a function
of (seed, epoch)) the uninterrupted run would have used, so it ends where that run ends.

Measured on MovieLens-100K (3 age-group domains, 80k training rows; `mdmt compare --models
shared_bottom --seeds 3 --epochs 20`, defaults otherwise: batch 2048, inner_lr 1e-3 (Adam),
beta = gamma = 0.5, k = 2, --precision auto = mixed_bfloat16 here). Test mean AUC, mean +-
std over seeds 0-2; training seconds per run on a shared 2-core VM (load 3-8, so +-30 %):
    strategy  granularity   test mean AUC      s/run   (both granularities ~200 steps/epoch)
    mamdr     pass          0.7920 +- 0.0013   60-85
    mamdr     batch         0.7917 +- 0.0008   60-78
    dn        pass          0.7937 +- 0.0006   12
    dn        batch         0.7933 +- 0.0003   10
    dr        pass          0.7915 +- 0.0007   31
    dr        batch         0.7907 +- 0.0010   33
  references: plain training 0.7926 +- 0.0010 (8 s); mamdr before this rewrite (batch, DN
  at theta + theta_d, DR by SGD, one train_step per outer iteration) 0.7933 +- 0.0002 (35
  s); mamdr pass with beta = gamma = 0.1 (the official configs' value) 0.7848 +- 0.0007,
  still rising at epoch 20 (one Reptile step per epoch moves theta a tenth of a pass).
"pass" is the default: at least as good as "batch" for every strategy (the differences
are within the seeds' spread). The learning rates are unchanged: on this data both
granularities take about as many inner steps per epoch, so the same alpha fits both.
"""
from __future__ import annotations

import dataclasses

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from mdmt_tf.errors import ConfigError
from mdmt_tf.layers._util import select_by_domain
from mdmt_tf.models.base import MDMTModel
from mdmt_tf.training.losses import mdmt_loss
from mdmt_tf.training.options import INNER_OPTIMIZERS, SCOPES, check_mamdr_options

STRATEGIES = ("dn", "dr", "mamdr")
DEFAULT_GRANULARITY = "pass"

# what a train step does (the "phase" of its control dict)
PLAIN, DN, DR, SKIP = 0, 1, 2, 3
CONTROL_KEYS = ("phase", "domain", "begin", "end", "last", "epoch_end")


def control(phase: int, domain: int = -1, begin: int = 0, end: int = 0, last: int = 0,
            epoch_end: int = 0) -> dict:
    """A train step's control dict. phase: PLAIN, DN, DR or SKIP (padding, does nothing);
    domain: DN's domain (for dn_with_specific) / DR's target domain i; begin / end: the
    step begins / ends a DN outer iteration (save theta~ <- theta / the Reptile step) or a
    DR update (theta~_i <- theta_i / theta_i's interpolation); last: ends an outer
    iteration; epoch_end: the epoch's last step."""
    values = dict(zip(CONTROL_KEYS, (phase, domain, begin, end, last, epoch_end)))
    return {key: tf.constant(value, tf.int32) for key, value in values.items()}


def specific_mask(model: MDMTModel, scope: str) -> list[bool]:
    """Which trainable variables get domain-specific copies."""
    if scope not in SCOPES:
        raise ConfigError(f"MAMDR scope must be one of {list(SCOPES)}, got {scope!r}")
    return [scope == "all" or "embedding" not in v.path for v in model.trainable_variables]


# ---------------------------------------------------------------------- the schedule
@dataclasses.dataclass(frozen=True)
class _Visit:
    """Training on one domain's data inside an outer iteration."""

    phase: int
    domain: int          # control "domain": DN's domain, DR's target, -1 for mixed plain batches
    data: int | None     # whose rows (None: every training row)
    steps: int | None    # batches (None: one pass, capped at `cap` batches)
    begin: bool = False
    end: bool = False
    cap: int = 0


class MAMDRSchedule:
    """The plan of every epoch: for each train step, the training rows of its batch and its
    control dict. An epoch is a function of (seed, epoch) only, so a resumed run replays
    exactly what the uninterrupted run would have done. Epochs have a constant number of
    steps (`steps_per_epoch`): with "pass" granularity DR's length depends on the sampled
    support domains, and shorter epochs are padded with SKIP steps (empty batches)."""

    def __init__(self, domain, *, strategy: str, granularity: str, batch_size: int, k: int = 2,
                 inner_steps: int = 1, dr_target_steps: int = 0, seed: int = 0):
        domain = np.asarray(domain).astype(np.int64)
        self.domains = sorted(np.unique(domain).tolist())
        self.rows = {d: np.flatnonzero(domain == d) for d in self.domains}
        self.total = len(domain)
        self.strategy, self.granularity = strategy, granularity
        self.batch_size, self.inner_steps, self.cap = int(batch_size), int(inner_steps), int(dr_target_steps)
        self.k = min(int(k), max(1, len(self.domains) - 1))
        self.seed = int(seed)
        self.use_dn, self.use_dr = strategy in ("dn", "mamdr"), strategy in ("dr", "mamdr")
        if granularity == "batch":
            self.iterations = max(1, self.total // (self.batch_size * len(self.domains)))
        else:
            self.iterations = 1
        self.steps_per_epoch = self._longest_epoch()

    # ------------------------------------------------------------------ sizes
    def _batches(self, rows: int) -> int:
        return -(-rows // self.batch_size)

    def _visit_steps(self, visit: _Visit) -> int:
        if visit.steps is not None:
            return visit.steps
        n = self._batches(self.total if visit.data is None else len(self.rows[visit.data]))
        return min(n, visit.cap) if visit.cap else n

    def _visit_rows(self, visit: _Visit) -> float:
        size = self.total if visit.data is None else len(self.rows[visit.data])
        if visit.steps is not None:
            return visit.steps * min(self.batch_size, size)
        return min(size, visit.cap * self.batch_size) if visit.cap else size

    def _others(self, d):
        return [j for j in self.domains if j != d]

    def _longest_epoch(self) -> int:
        """Steps of the longest possible epoch (DR with the largest support domains)."""
        steps = sum(self._visit_steps(v) for v in self._shared_visits(self.domains))
        if self.use_dr:
            for i in self.domains:
                support = sorted((self._visit_steps(self._support(i, j)) for j in self._others(i)), reverse=True)
                steps += sum(support[:self.k]) + self.k * self._visit_steps(self._target(i))
        return self.iterations * steps

    def expected_rows_per_step(self) -> float:
        """Training rows per step on average (for examples/s): support domains drawn uniformly."""
        rows = float(sum(self._visit_rows(v) for v in self._shared_visits(self.domains)))
        if self.use_dr:
            for i in self.domains:
                others = self._others(i)
                rows += self.k * (float(np.mean([self._visit_rows(self._support(i, j)) for j in others]))
                                  + self._visit_rows(self._target(i)))
        return self.iterations * rows / self.steps_per_epoch

    # ------------------------------------------------------------------ plan
    def _length(self):
        return None if self.granularity == "pass" else self.inner_steps

    def _support(self, i, j) -> _Visit:
        return _Visit(DR, i, j, self._length(), begin=True)

    def _target(self, i) -> _Visit:
        return _Visit(DR, i, i, self._length(), end=True, cap=self.cap)

    def _shared_visits(self, order) -> list[_Visit]:
        if self.use_dn:
            return [_Visit(DN, d, d, self._length(), begin=n == 0, end=n == len(order) - 1)
                    for n, d in enumerate(order)]
        if self.granularity == "pass":  # strategy "dr": theta by plain steps over every row
            return [_Visit(PLAIN, -1, None, None)]
        return [_Visit(PLAIN, d, d, 1) for d in order]

    def outer_iteration(self, rng: np.random.Generator) -> list[_Visit]:
        """DN (or plain steps) on the domains in a shuffled order, then DR's updates: for
        each target domain, k support domains drawn without replacement, independently."""
        order = [self.domains[n] for n in rng.permutation(len(self.domains))]
        visits = self._shared_visits(order)
        if self.use_dr:
            for i in order:
                others = self._others(i)
                for n in rng.choice(len(others), size=self.k, replace=False):
                    visits += [self._support(i, others[n]), self._target(i)]
        return visits

    def epoch(self, epoch: int):
        """Yields (rows int64 [b], control values tuple) for each step of `epoch`."""
        rng = np.random.default_rng([self.seed, int(epoch)])
        streams: dict = {}  # "batch" granularity: each domain's rows in a shuffled order, consumed in turn
        produced = 0
        for _ in range(self.iterations):
            visits = self.outer_iteration(rng)
            for number, visit in enumerate(visits):
                batches = list(self._batches_of(visit, rng, streams))
                for step, rows in enumerate(batches):
                    last = number == len(visits) - 1 and step == len(batches) - 1
                    produced += 1
                    yield rows, (visit.phase, visit.domain, int(visit.begin and step == 0),
                                 int(visit.end and step == len(batches) - 1), int(last),
                                 int(produced == self.steps_per_epoch))
        empty = np.zeros((0,), np.int64)
        while produced < self.steps_per_epoch:
            produced += 1
            yield empty, (SKIP, -1, 0, 0, 0, int(produced == self.steps_per_epoch))

    def _batches_of(self, visit: _Visit, rng, streams):
        rows = np.arange(self.total) if visit.data is None else self.rows[visit.data]
        if visit.steps is None:  # one pass in a new order
            order = rows[rng.permutation(len(rows))]
            for n in range(self._visit_steps(visit)):
                yield order[n * self.batch_size:(n + 1) * self.batch_size]
            return
        for _ in range(visit.steps):  # fresh batches: the next ones of the domain's stream
            order, position = streams.get(visit.data, (None, len(rows)))
            if position >= len(rows):
                order, position = rows[rng.permutation(len(rows))], 0
            streams[visit.data] = (order, position + self.batch_size)
            yield order[position:position + self.batch_size]

    def dataset(self, features: dict, labels: dict, first_epoch) -> tf.data.Dataset:
        """(features, labels, control) batches, epoch after epoch from `first_epoch()` (called
        when iteration starts, so a resumed run starts at its next epoch), without end."""

        def generate():
            epoch = int(first_epoch())
            while True:
                yield from self.epoch(epoch)
                epoch += 1

        signature = (tf.TensorSpec([None], tf.int64), tf.TensorSpec([len(CONTROL_KEYS)], tf.int32))
        tensors = tf.nest.map_structure(tf.constant, (features, labels))

        def gather(rows, values):
            features, labels = tf.nest.map_structure(lambda column: tf.gather(column, rows), tensors)
            return features, labels, dict(zip(CONTROL_KEYS, tf.unstack(values)))

        steps = tf.data.Dataset.from_generator(
            lambda: ((rows, np.asarray(values, np.int32)) for rows, values in generate()),
            output_signature=signature)
        return steps.map(gather).prefetch(tf.data.AUTOTUNE)


# ------------------------------------------------------------------------ the trainer
class MAMDRTrainer(keras.Model):
    """One train_step = one inner step on one batch, as its control dict says (see the
    module doc). `training_data` gives the dataset, steps per epoch and rows per step."""

    def __init__(self, model: MDMTModel, *, strategy: str = "mamdr", domains: list[int] | None = None,
                 granularity: str = DEFAULT_GRANULARITY, inner_lr: float = 1e-3, outer_lr: float = 0.5,
                 dr_lr: float = 0.5, k: int = 2, inner_steps: int = 1, inner_optimizer: str = "adam",
                 learning_rate: float = 1e-3, scope: str = "dense", dn_with_specific: bool = False,
                 dr_target_steps: int = 0, seed: int = 0, task_weights: dict | None = None,
                 loss_reduction: str = "pair", **kwargs):
        super().__init__(name=kwargs.pop("name", "mamdr_trainer"), **kwargs)
        if strategy not in STRATEGIES:
            raise ConfigError(f"MAMDR strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
        if inner_optimizer not in INNER_OPTIMIZERS:
            raise ConfigError(f"inner_optimizer must be one of {list(INNER_OPTIMIZERS)}, got {inner_optimizer!r}")
        check_mamdr_options(granularity=granularity, inner_lr=inner_lr, outer_lr=outer_lr, dr_lr=dr_lr, k=k,
                      inner_steps=inner_steps, dr_target_steps=dr_target_steps)
        self.net = model
        self.strategy, self.granularity = strategy, granularity
        self.domain_ids = list(domains if domains is not None else range(model.schema.num_domains))
        if len(self.domain_ids) < 2 and strategy != "dn":
            raise ConfigError("MAMDR's Domain Regularization needs at least 2 domains with training data")
        if dn_with_specific and strategy != "mamdr":
            raise ConfigError("dn_with_specific (DN's steps at theta + theta_d) needs strategy 'mamdr'")
        self.outer_lr, self.dr_lr = float(outer_lr), float(dr_lr)
        self.k = min(int(k), max(1, len(self.domain_ids) - 1))
        self.inner_steps, self.dr_target_steps = int(inner_steps), int(dr_target_steps)
        self.dn_with_specific = bool(dn_with_specific)
        self.seed = int(seed)
        self.task_weights, self.loss_reduction = dict(task_weights or {}), loss_reduction
        variables = model.trainable_variables
        self.use_dn = strategy in ("dn", "mamdr")
        self.use_dr = strategy in ("dr", "mamdr")
        self.mask = specific_mask(model, scope) if self.use_dr else [False] * len(variables)
        self.specific = tuple(i for i, m in enumerate(self.mask) if m)  # indices into trainable_variables
        # theta_d: one [num_domains, *shape] variable per domain-specific variable, in that
        # variable's dtype (float32 under mixed precision), zero: the model starts shared.
        # Each is an attribute of its own: tf.train.Checkpoint tracks attributes, not lists.
        self.deltas = []
        for n, i in enumerate(self.specific):
            v = variables[i]
            delta = keras.Variable(np.zeros((model.schema.num_domains, *v.shape)), dtype=v.dtype, trainable=False,
                                   autocast=False, name=f"theta_d_{n}")
            setattr(self, f"theta_d_{n}", delta)
            self.deltas.append(delta)
        # the model's RNG streams (dropout, OOV replacement): Keras seed generators are not in
        # TF checkpoints; as attributes here they are, so a resumed run continues them
        rng_states = [v for v in model.non_trainable_variables if v.path.endswith("seed_generator_state")]
        for n, state in enumerate(rng_states):
            setattr(self, f"rng_state_{n}", state)
        # theta saved at the start of a DN iteration / a DR update (not checkpointed: every
        # epoch ends on an outer iteration's end, with theta in the model)
        self.saved = [keras.Variable(np.zeros(v.shape), dtype=v.dtype, trainable=False, autocast=False,
                                     name=f"theta_saved_{i}") for i, v in enumerate(variables)]

        def make(lr):
            return keras.optimizers.SGD(lr) if inner_optimizer == "sgd" else keras.optimizers.Adam(lr)

        self.inner_optimizer = make(inner_lr)  # DN's and DR's steps
        self.inner_optimizer.build(variables)
        self.plain_optimizer = keras.optimizers.Adam(learning_rate)  # strategy "dr": theta's plain steps
        if strategy == "dr":
            self.plain_optimizer.build(variables)
        self.outer_iterations = keras.Variable(0, dtype="int64", trainable=False, name="outer_iterations")
        self.epochs_done = keras.Variable(0, dtype="int64", trainable=False, name="epochs_done")
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.built = True  # every variable exists

    @property
    def metrics(self):
        return [self.loss_tracker]

    def call(self, features, training=None):
        return self.net(features, training=training)

    def compile(self, **kwargs):
        super().compile(optimizer=self.inner_optimizer, jit_compile=False, **kwargs)

    # ------------------------------------------------------------------ data
    def schedule(self, domain, batch_size: int) -> MAMDRSchedule:
        return MAMDRSchedule(domain, strategy=self.strategy, granularity=self.granularity, batch_size=batch_size,
                             k=self.k, inner_steps=self.inner_steps, dr_target_steps=self.dr_target_steps,
                             seed=self.seed)

    def training_data(self, features: dict, labels: dict, batch_size: int):
        """(dataset of (features, labels, control), steps per epoch, training rows per step)."""
        schedule = self.schedule(features[self.net.schema.domain], batch_size)
        dataset = schedule.dataset(features, labels, lambda: int(ops.convert_to_numpy(self.epochs_done)))
        return dataset, schedule.steps_per_epoch, schedule.expected_rows_per_step()

    # ------------------------------------------------------------------ pieces
    def _values(self, domain=None):
        """Trainable values theta, or theta + theta_domain (domain a scalar tensor)."""
        values = [v.value for v in self.net.trainable_variables]
        if domain is not None:
            for delta, i in zip(self.deltas, self.specific):
                values[i] = values[i] + ops.take(delta.value, domain, axis=0)
        return values

    def _loss(self, features, labels, values):
        outputs, non_trainable, losses = self.net.stateless_call(
            values, [v.value for v in self.net.non_trainable_variables], features, training=True,
            labels=labels, return_losses=True)
        for variable, value in zip(self.net.non_trainable_variables, non_trainable):
            variable.assign(value)
        loss = mdmt_loss(labels, outputs, features[self.net.schema.domain], self.net.schema.num_domains,
                         self.net.schema.tasks, self.task_weights, self.loss_reduction)
        return loss + (ops.sum(ops.stack([ops.cast(term, "float32") for term in losses])) if losses else 0.0), loss

    def _step(self, optimizer, features, labels, variables, domain=None):
        """One optimizer step on `variables` with the loss at the model's values (+ theta_domain)."""
        with tf.GradientTape() as tape:
            total, loss = self._loss(features, labels, self._values(domain))
        optimizer.apply(tape.gradient(total, variables), variables)
        return loss

    @staticmethod
    def _when(flag, action):
        def run():
            action()
            return tf.constant(True)

        return tf.cond(flag > 0, run, lambda: tf.constant(False))

    # ------------------------------------------------------------------ phases
    def _plain_step(self, features, labels, control):
        return self._step(self.plain_optimizer, features, labels, self.net.trainable_variables)

    def _dn_step(self, features, labels, control):
        """An inner step of DN on theta~ (the model's variables); theta saved at the
        iteration's first step, the Reptile step after its last."""
        variables = self.net.trainable_variables

        def save():
            for saved, v in zip(self.saved, variables):
                saved.assign(v)

        def reptile():
            for saved, v in zip(self.saved, variables):
                v.assign(saved + self.outer_lr * (v - saved))

        self._when(control["begin"], save)
        loss = self._step(self.inner_optimizer, features, labels, variables,
                          control["domain"] if self.dn_with_specific else None)
        self._when(control["end"], reptile)
        return loss

    def _dr_step(self, features, labels, control):
        """A step of a DR update of theta_i, i = control["domain"]: the model's specific
        variables hold theta + theta~_i during the update (set at its first step); after its
        last step theta_i <- theta_i + gamma * (theta~_i - theta_i) and theta is put back."""
        variables = self.net.trainable_variables
        specific = [variables[i] for i in self.specific]
        saved = [self.saved[i] for i in self.specific]
        domain = control["domain"]

        def begin():
            for keep, v, delta in zip(saved, specific, self.deltas):
                keep.assign(v)
                v.assign(keep + ops.take(delta.value, domain, axis=0))

        def update():
            for keep, v, delta in zip(saved, specific, self.deltas):
                theta_i = ops.take(delta.value, domain, axis=0)
                theta_i = theta_i + self.dr_lr * ((v - keep) - theta_i)  # theta~_i = v - theta
                delta.assign(ops.scatter_update(delta.value, ops.reshape(domain, (1, 1)), theta_i[None]))
                v.assign(keep)

        self._when(control["begin"], begin)
        loss = self._step(self.inner_optimizer, features, labels, specific)
        self._when(control["end"], update)
        return loss

    def train_step(self, data):
        features, labels, control = data
        skip = lambda: tf.constant(0.0)  # noqa: E731
        branches = [skip] * 4
        if self.use_dn:
            branches[DN] = lambda: self._dn_step(features, labels, control)
        else:
            branches[PLAIN] = lambda: self._plain_step(features, labels, control)
        if self.use_dr:
            branches[DR] = lambda: self._dr_step(features, labels, control)
        loss = tf.switch_case(control["phase"], branches)
        self.loss_tracker.update_state(loss, sample_weight=ops.cast(control["phase"] != SKIP, "float32"))
        self.outer_iterations.assign_add(ops.cast(control["last"], "int64"))
        self.epochs_done.assign_add(ops.cast(control["epoch_end"], "int64"))
        return {"loss": self.loss_tracker.result()}

    def steps_taken(self) -> dict:
        """{"outer": outer iterations (DN Reptile steps / DR rounds) so far}."""
        return {"outer": int(ops.convert_to_numpy(self.outer_iterations))}

    def serving_model(self, net: MDMTModel | None = None) -> keras.Model:
        """The model to evaluate and export: theta + theta_d per sample with DR, else theta.
        `net`: a copy of the model (e.g. under another dtype policy) to serve instead,
        theta_d then cast to its variables' dtypes."""
        base = self.net if net is None else net
        if not self.use_dr:
            return base
        deltas = self.deltas
        if net is not None:
            variables = net.trainable_variables
            deltas = [keras.Variable(ops.cast(delta.value, variables[i].dtype), dtype=variables[i].dtype,
                                     trainable=False, autocast=False, name=delta.name)
                      for delta, i in zip(self.deltas, self.specific)]
        return DomainSpecificModel(base, deltas, self.specific)


class DomainSpecificModel(keras.Model):
    """Scores each sample with theta + theta_d, d its domain: the wrapped model is run once
    per domain with that domain's parameters (Keras stateless_call) and each sample keeps
    its own domain's outputs. Exportable like the wrapped model.

    deltas: one [num_domains, *shape] variable per entry of `specific` (indices into the
    base's trainable variables). theta + theta_d is parameter arithmetic, done in the
    variables' own dtype: this wrapper's dtype policy is the base's variable dtype and it
    does not autocast. (Under mixed_bfloat16 a mixed wrapper would read its float32
    variables as bfloat16 inside its autocast scope, except those created with
    autocast=False, e.g. M3oE's and STAR's: float32 + bfloat16, a TypeError.) The wrapped
    model's layers cast the sums to their compute dtype as they cast their own variables."""

    def __init__(self, base: MDMTModel, deltas, specific, **kwargs):
        kwargs.setdefault("dtype", base.dtype_policy.variable_dtype)
        kwargs.setdefault("autocast", False)
        super().__init__(name=kwargs.pop("name", base.name), **kwargs)
        self.base = base
        self.schema = base.schema
        self.delta_variables = list(deltas)  # tracked, hence exported
        self.specific = tuple(specific)

    def call(self, features, training=None):
        domain = ops.cast(features[self.schema.domain], "int32")
        non_trainable = [v.value for v in self.base.non_trainable_variables]
        position = {i: n for n, i in enumerate(self.specific)}
        per_domain = []
        for d in range(self.schema.num_domains):
            values = [v.value if i not in position else v.value + self.delta_variables[position[i]].value[d]
                      for i, v in enumerate(self.base.trainable_variables)]
            outputs, _ = self.base.stateless_call(values, non_trainable, features, training=False)
            per_domain.append(outputs)
        return {task: select_by_domain(ops.stack([o[task] for o in per_domain], axis=1), domain,
                                       self.schema.num_domains)
                for task in self.schema.tasks}

    def architecture_values(self):
        return self.base.architecture_values()
