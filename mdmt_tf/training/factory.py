"""The one construction of a run's trainer, used by `mdmt train` (Run), the tuner's trials and
`mdmt bench train`: the model's trainer (MDMTTrainer for --strategy plain, MAMDRTrainer for
dn / dr / mamdr) and the batches it trains on. Both trainers expose the same small
interface: `serving_model(net=None)` (the model to evaluate and export: net itself, or theta +
theta_d per domain with Domain Regularization) and `steps_taken()`."""
from __future__ import annotations

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from mdmt_tf.data.dataset import make_dataset
from mdmt_tf.data.stream import StreamedSplits
from mdmt_tf.errors import ConfigError
from mdmt_tf.training.balance import make_balance
from mdmt_tf.training.config import TrainConfig
from mdmt_tf.training.encoded import EncodedData, SplitData, take
from mdmt_tf.training.mamdr import MAMDRTrainer
from mdmt_tf.training.optimizers import weight_optimizer
from mdmt_tf.training.trainer import MDMTTrainer


@dataclasses.dataclass
class TrainerSetup:
    """A trainer and what `trainer.fit` needs: its training batches, the steps of an epoch
    (None: one pass over `train`) and the training examples a step consumes (for examples/s)."""

    trainer: keras.Model
    train: tf.data.Dataset
    steps_per_epoch: int | None
    examples_per_step: float


def make_trainer(model, enc: SplitData, config: TrainConfig, seed: int, *, learning_rate: float | None = None,
                 arch_learning_rate: float | None = None, arch_mode: str | None = None,
                 drop_remainder: bool = False) -> TrainerSetup:
    """The trainer of `model` on the encoded data under `config`; `seed` shuffles the batches
    (a resumed run passes one derived from the epoch it resumes after). The keyword
    arguments override the config (a tuner trial's searched values); drop_remainder drops
    each pass's last partial batch (benchmarks time full batches only)."""
    c = config
    if c.strategy != "plain":
        if isinstance(enc, StreamedSplits):
            raise ConfigError(f"--strategy {c.strategy} (MAMDR) trains per domain from in-memory data; the streaming "
                              "input (--data shards:DIR) supports --strategy plain")
        m = c.mamdr
        domains = sorted(set(enc.domain["train"].tolist()))
        trainer = MAMDRTrainer(model, strategy=c.strategy, domains=domains, granularity=m.granularity,
                               inner_lr=m.inner_lr, outer_lr=m.outer_lr, dr_lr=m.dr_lr, k=m.k,
                               inner_steps=m.inner_steps, inner_optimizer=m.inner_optimizer,
                               learning_rate=learning_rate if learning_rate is not None else c.learning_rate,
                               scope=m.scope, dn_with_specific=m.dn_with_specific, dr_target_steps=m.dr_target_steps,
                               seed=c.seed, task_weights=dict(c.task_weights), loss_reduction=c.loss_reduction)
        # the schedule of epoch e is a function of (seed, e): a resumed run replays the uninterrupted one
        train, steps, rows_per_step = trainer.training_data(enc.features["train"], enc.labels["train"], c.batch_size)
        return TrainerSetup(trainer, train, steps, rows_per_step)
    trainer, train, steps = _plain_trainer(model, enc, c, seed, learning_rate=learning_rate,
                                           arch_learning_rate=arch_learning_rate, arch_mode=arch_mode,
                                           drop_remainder=drop_remainder)
    return TrainerSetup(trainer, train, steps, c.batch_size)


def _plain_trainer(model, enc: SplitData, c: TrainConfig, seed: int, *, learning_rate: float | None,
                   arch_learning_rate: float | None, arch_mode: str | None, drop_remainder: bool):
    """(MDMTTrainer, its training batches, the steps of an epoch or None for one pass) for
    `model` on the encoded data.

    The architecture steps' batches: bilevel reads a held-out slice of the training rows
    (arch_data "holdout:FRACTION", the default: those rows never enter a weight step) or
    the validation split ("val"); authors reads a second, separately shuffled pass over the
    training rows, as the released code does. The validation split is what picks the best
    epoch and scores tuner trials: a search that also fits alpha / beta on it would choose
    them on the data that then judges them. Models without architecture variables, and
    arch modes that do not search, train the weights on every training row."""
    arch_mode = arch_mode or c.arch_mode
    lr = learning_rate if learning_rate is not None else c.learning_rate
    searching = bool(model.architecture_variables) and arch_mode in ("bilevel", "authors")
    steps = None
    if isinstance(enc, StreamedSplits):
        train, heldout, train_rows, steps = _streamed_batches(enc, c, seed, searching, arch_mode, drop_remainder)
    else:
        train, heldout, train_rows = _in_memory_batches(enc, c, seed, searching, arch_mode, drop_remainder)
    trainer = MDMTTrainer(model, arch_mode=arch_mode, learning_rate=lr,
                          arch_learning_rate=arch_learning_rate if arch_learning_rate is not None
                          else c.arch_learning_rate, arch_period=c.arch_period, heldout=heldout,
                          steps_per_epoch=steps or int(np.ceil(train_rows / c.batch_size)),
                          task_weights=dict(c.task_weights), loss_reduction=c.loss_reduction,
                          jit_compile=c.jit_compile, checkpoint_heldout=not isinstance(enc, StreamedSplits),
                          balance=make_balance(c.balance.method, model.schema.domains, model.schema.tasks,
                                               unit=c.balance.unit, target_task=c.balance.target_task,
                                               alpha=c.balance.alpha, relax=c.balance.relax, beta=c.balance.beta,
                                               learning_rate=lr),
                          weight_optimizer=weight_optimizer(c.embedding_optimizer, lr, model.embedding_rows()))
    return trainer, train, steps


def _streamed_batches(enc: StreamedSplits, c: TrainConfig, seed: int, searching: bool, arch_mode: str,
                      drop_remainder: bool):
    """(training batches, architecture batches or None, training rows, steps of an epoch or
    None) from the shards: the held-out slice is the records whose fingerprint falls in the
    first FRACTION of 1000 bins (deterministic, whatever the shard order). Under
    MultiWorkerMirrored with shards that deal evenly, each worker reads its own
    (StreamedSplits.worker_batches); else every worker reads all and keeps its part of each
    batch (DATA)."""
    heldout, keep = None, None
    rows = enc.rows("train")
    kept = 1.0
    def shuffled(split, split_seed, keep=None):
        return enc.batches(split, c.batch_size, shuffle=True, seed=split_seed, keep=keep, buffer=c.shuffle_buffer,
                           drop_remainder=drop_remainder)

    if searching and arch_mode == "authors":
        heldout = shuffled("train", seed + 2)
    elif searching and (fraction := c.holdout_fraction()) is not None:
        cut = max(1, int(round(fraction * 1000)))
        heldout = shuffled("train", seed + 1, keep=lambda record: tf.strings.to_hash_bucket_fast(record, 1000) < cut)

        def keep(record):
            return tf.strings.to_hash_bucket_fast(record, 1000) >= cut

        kept = (1000 - cut) / 1000
        rows = int(round(rows * kept))  # about: the exact count is known after a pass
    elif searching:
        heldout = shuffled("val", seed + 1)
    workers = _workers()
    per_worker = enc.worker_batches("train", c.batch_size, workers, seed=seed, keep=keep, buffer=c.shuffle_buffer,
                                    kept=kept) if workers > 1 else None
    if per_worker is not None:
        dataset_fn, steps = per_worker
        return tf.distribute.get_strategy().distribute_datasets_from_function(dataset_fn), heldout, rows, steps
    return shuffled("train", seed, keep), heldout, rows, None


def _workers() -> int:
    """The workers of the tf.distribute strategy in scope (1 without a cluster)."""
    if not tf.distribute.has_strategy():
        return 1
    resolver = getattr(tf.distribute.get_strategy(), "cluster_resolver", None)
    if resolver is None:
        return 1
    jobs = resolver.cluster_spec().as_dict()
    return sum(len(jobs.get(job, [])) for job in ("chief", "worker")) or 1


def _in_memory_batches(enc: EncodedData, c: TrainConfig, seed: int, searching: bool, arch_mode: str,
                       drop_remainder: bool):
    """(training batches, architecture batches or None, training rows) from the arrays."""
    train_rows = np.arange(enc.rows("train"))
    heldout = None
    if searching and arch_mode == "authors":
        heldout = make_dataset(enc.features["train"], enc.labels["train"], batch_size=c.batch_size, shuffle=True,
                               seed=seed + 2, drop_remainder=drop_remainder)
    elif searching and (fraction := c.holdout_fraction()) is not None:
        order = np.random.default_rng(c.seed).permutation(len(train_rows))
        cut = max(1, int(round(fraction * len(order))))
        held, train_rows = np.sort(order[:cut]), np.sort(order[cut:])
        heldout = make_dataset(take(enc.features["train"], held), take(enc.labels["train"], held),
                               batch_size=c.batch_size, shuffle=True, seed=seed + 1, drop_remainder=drop_remainder)
    elif searching:
        heldout = make_dataset(enc.features["val"], enc.labels["val"], batch_size=c.batch_size, shuffle=True,
                               seed=seed + 1, drop_remainder=drop_remainder)
    train = make_dataset(take(enc.features["train"], train_rows), take(enc.labels["train"], train_rows),
                         batch_size=c.batch_size, shuffle=c.shuffle_buffer > 0, seed=seed,
                         drop_remainder=drop_remainder)
    return train, heldout, len(train_rows)
