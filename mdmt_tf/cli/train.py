"""`mdmt train` and `mdmt evaluate`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from mdmt_tf.cli.data import add_data_flags
from mdmt_tf.cli.formatting import DefaultsHelp
from mdmt_tf.errors import ConfigError


def _key_values(items: list[str] | None, flag: str) -> dict:
    """['a=1', 'b=[2, 3]'] -> {'a': 1, 'b': [2, 3]} (values parsed as YAML)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} expects KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _hparams_file(args) -> dict:
    path = Path(args.hparams)
    if not path.exists():
        raise ConfigError(f"--hparams file {path} does not exist")
    try:
        loaded = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"--hparams {path}: cannot parse: {err}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"--hparams {path} must hold a mapping of hyper-parameters")
    return loaded


def model_config_from_args(args):
    """--model NAME, --hparams FILE (a model config {name, params[, train]} as `mdmt tune`
    writes, or a flat dict of hyper-parameters), --param KEY=VALUE overrides."""
    from mdmt_tf.models import ModelConfig

    name, params = args.model, {}
    if args.hparams:
        loaded = _hparams_file(args)
        if "name" in loaded:
            if name and name != loaded["name"]:
                raise ConfigError(f"--model {name} contradicts --hparams {args.hparams} (model {loaded['name']!r})")
            name, params = loaded["name"], dict(loaded.get("params") or {})
        else:
            params = dict(loaded.get("params", loaded))
    if not name:
        raise ConfigError("--model NAME is required (or a --hparams file that names the model)")
    params.update(_key_values(args.param, "--param"))
    return ModelConfig(name, params)


# flag attribute -> TrainConfig setting (flags default to None: TrainConfig holds the defaults)
TRAIN_FLAGS = {"epochs": "epochs", "batch_size": "batch_size", "lr": "learning_rate", "arch_lr": "arch_learning_rate",
               "arch_mode": "arch_mode", "arch_period": "arch_period", "arch_data": "arch_data",
               "patience": "patience", "seed": "seed", "loss_reduction": "loss_reduction", "strategy": "strategy",
               "precision": "precision", "jit": "jit_compile", "serving_precision": "serving_precision",
               "min_count": "min_count", "strategy_distribute": "distribute", "eval_batch_size": "eval_batch_size",
               "embedding_optimizer": "embedding_optimizer", "shuffle_buffer": "shuffle_buffer"}
MAMDR_FLAGS = {"mamdr_inner_lr": "inner_lr", "mamdr_outer_lr": "outer_lr", "mamdr_dr_lr": "dr_lr", "mamdr_k": "k",
               "mamdr_inner_steps": "inner_steps", "mamdr_inner_optimizer": "inner_optimizer",
               "mamdr_scope": "scope", "mamdr_granularity": "granularity",
               "mamdr_dn_with_specific": "dn_with_specific", "mamdr_dr_target_steps": "dr_target_steps"}
BALANCE_FLAGS = {"loss_balance": "method", "balance_unit": "unit", "target_task": "target_task",
                 "gradnorm_alpha": "alpha", "relax_factor": "relax", "balance_beta": "beta"}


def train_config_from_args(args):
    """A TrainConfig from the flags given, over a --hparams file's `train` values, over
    TrainConfig's defaults (the one place they are written)."""
    from mdmt_tf.training.config import TrainConfig

    tuned = dict(_hparams_file(args).get("train") or {}) if getattr(args, "hparams", None) else {}
    given = {key: getattr(args, flag) for flag, key in TRAIN_FLAGS.items() if getattr(args, flag) is not None}
    mamdr = {key: getattr(args, flag) for flag, key in MAMDR_FLAGS.items() if getattr(args, flag) is not None}
    weights = {k: float(v) for k, v in _key_values(args.task_weight, "--task-weight").items()}
    balance = {key: getattr(args, flag) for flag, key in BALANCE_FLAGS.items() if getattr(args, flag) is not None}
    values = {**tuned, **given, "mamdr": {**(tuned.get("mamdr") or {}), **mamdr},
              "balance": {**(tuned.get("balance") or {}), **balance}}
    if weights:
        values["task_weights"] = weights
    return TrainConfig.from_dict(values)


def load_data(args, min_count: int):
    """The --data source split and with vocabularies (ids seen fewer than min_count times in
    training map to the OOV bucket)."""
    from mdmt_tf.data.dataset import MDMTData
    from mdmt_tf.data.sources import load_source

    spec, splits = load_source(args.data, args.spec, split_seed=args.split_seed, split=args.split)
    return MDMTData.build(spec, splits, min_count=min_count)


def streamed_data(args, min_count: int):
    """--data shards:DIR: the StreamData of one scan over the shards (None for other sources)."""
    from mdmt_tf.data.sources import parse_source, resolve_spec
    from mdmt_tf.data.stream import StreamData

    kind, rest = parse_source(args.data)
    if kind != "shards":
        return None
    if args.split != "random":
        raise ConfigError("--split does not apply to --data shards:DIR (its train/val/test shards are the split)")
    return StreamData.scan(rest, resolve_spec(Path(rest), args.spec), min_count=min_count)


def cmd_train(args) -> int:
    from mdmt_tf.report.tables import auc_table
    from mdmt_tf.training.fit import train
    from mdmt_tf.training.runtime import distribution_strategy

    model_config = model_config_from_args(args)
    config = train_config_from_args(args)
    strategy = distribution_strategy(config.distribute)  # before the data's first TF op (a streamed scan)
    data = streamed_data(args, config.min_count) or load_data(args, config.min_count)
    source = f"{args.data} split={args.split} split_seed={args.split_seed}"
    payload = train(model_config, data, config, args.out, source=source, strategy=strategy)
    domains, tasks = payload["data"]["domains"], payload["data"]["tasks"]
    print()
    print(auc_table(payload["test"], domains, tasks, title=f"{model_config.name} test"))
    speed = payload["train_examples_per_second"]
    print(f"\ntrained {payload['epochs_trained']} epochs (best {payload['best_epoch']}) in "
          f"{payload['train_seconds']:.1f} s, {speed:.0f} examples/s" if speed else "")
    served = payload["serving"]
    if "test_mean_auc" in served:
        print(f"exported in {served['precision']}: test mean AUC {served['test_mean_auc']:.4f} "
              f"(float32 {payload['test']['mean_auc']:.4f}), max |difference| of a probability "
              f"{served['test_max_abs_diff']:.4f}")
    print(f"wrote {args.out}/metrics.json, {args.out}/plots/, {args.out}/model/ (SavedModel)")
    return 0


def cmd_evaluate(args) -> int:
    from mdmt_tf.report.tables import auc_table
    from mdmt_tf.training.serving_eval import evaluate_savedmodel

    result, domains, tasks = evaluate_savedmodel(args.model_dir, args.data, args.spec, split_seed=args.split_seed,
                                                 split=args.split, which=args.which)
    print(auc_table(result, domains, tasks, title=f"{args.which} ({args.model_dir})"))
    if args.out:
        from mdmt_tf.report.metrics import write_metrics

        write_metrics(args.out, {args.which: result})
        print(f"wrote {args.out}")
    return 0


def add_training_flags(p: argparse.ArgumentParser) -> None:
    """The training flags; every default is TrainConfig's (shown in the help), and a flag
    not given leaves the setting to a --hparams file's `train` values, then to that default."""
    from mdmt_tf.training.config import TrainConfig
    from mdmt_tf.training.options import (
        ARCH_MODES,
        AUTO_ROWS,
        BALANCE_UNITS,
        BALANCES,
        DISTRIBUTE,
        EMBEDDING_OPTIMIZERS,
        GRANULARITIES,
        INNER_OPTIMIZERS,
        PRECISIONS,
        REDUCTIONS,
        SCOPES,
        SERVING_PRECISIONS,
        STRATEGIES,
    )

    c, m = TrainConfig(), TrainConfig().mamdr
    p.add_argument("--epochs", type=int, default=None, help=f"at most; default {c.epochs} (or the search's)")
    p.add_argument("--batch-size", type=int, default=None, help=f"default {c.batch_size} (or the search's)")
    p.add_argument("--seed", type=int, default=None, help=f"model initialisation and data order; default {c.seed}")
    p.add_argument("--lr", type=float, default=None, help=f"weight learning rate (Adam); default {c.learning_rate:g}")
    p.add_argument("--arch-mode", default=None, choices=ARCH_MODES, help=f"default {c.arch_mode}")
    p.add_argument("--arch-lr", type=float, default=None,
                   help=f"architecture learning rate (Adam); default {c.arch_learning_rate:g}")
    p.add_argument("--arch-period", type=int, default=None,
                   help=f"an architecture step every N weight steps; default {c.arch_period}")
    p.add_argument("--arch-data", default=None,
                   help="where bilevel's architecture steps read batches: 'holdout:FRACTION' of the training rows "
                        f"(default {c.arch_data}; those rows then never enter a weight step) or 'val' (the "
                        "validation split, which also picks the best epoch); ignored by models and modes that do "
                        "not search")
    p.add_argument("--patience", type=int, default=None,
                   help=f"epochs without val_mean_auc gain before stopping; default {c.patience}")
    p.add_argument("--task-weight", action="append", metavar="TASK=W", help="loss weight of a task (default 1)")
    p.add_argument("--loss-reduction", default=None, choices=REDUCTIONS,
                   help="'pair': mean per (domain, task) then summed; 'sample': mean over the batch per task; "
                        f"default {c.loss_reduction}")
    p.add_argument("--strategy", default=None, choices=STRATEGIES,
                   help="MAMDR: domain negotiation (dn), domain regularization (dr), both (mamdr); "
                        f"default {c.strategy}")
    p.add_argument("--mamdr-granularity", default=None, choices=GRANULARITIES,
                   help="what training on a domain is: one full pass over its data (the official code's; one "
                        f"outer iteration per epoch) or --mamdr-inner-steps steps on fresh batches; default "
                        f"{m.granularity}")
    p.add_argument("--mamdr-k", type=int, default=None, help=f"DR: support domains per target domain; default {m.k}")
    p.add_argument("--mamdr-inner-lr", type=float, default=None,
                   help=f"alpha: DN's and DR's steps; default {m.inner_lr:g}")
    p.add_argument("--mamdr-outer-lr", type=float, default=None,
                   help=f"beta: DN's Reptile step; default {m.outer_lr:g}")
    p.add_argument("--mamdr-dr-lr", type=float, default=None, help=f"gamma: DR's interpolation; default {m.dr_lr:g}")
    p.add_argument("--mamdr-inner-steps", type=int, default=None,
                   help=f"steps per domain visit (granularity batch); default {m.inner_steps}")
    p.add_argument("--mamdr-inner-optimizer", default=None, choices=INNER_OPTIMIZERS,
                   help="of DN's and DR's steps (state kept across domains and epochs); sgd: the paper's algorithms; "
                        f"default {m.inner_optimizer}")
    p.add_argument("--mamdr-scope", default=None, choices=SCOPES,
                   help=f"which weights get domain-specific copies theta_d (dense: all but embeddings); default "
                        f"{m.scope}")
    p.add_argument("--mamdr-dn-with-specific", action="store_true", default=None,
                   help="--strategy mamdr: DN's steps at theta + theta_d instead of at theta alone (Algorithm 3)")
    p.add_argument("--mamdr-dr-target-steps", type=int, default=None,
                   help="granularity pass: cap DR's pass over the target domain at N batches (0: no cap)")
    b = c.balance
    p.add_argument("--loss-balance", default=None, choices=BALANCES,
                   help="balance the losses of the tasks (or of the (domain, task) pairs, --balance-unit pair): "
                        "uwl (learned uncertainty weights), gradnorm (gradient-norm targets), metabalance (auxiliary "
                        f"gradients pulled to --target-task's magnitude); --strategy plain; default {b.method}")
    p.add_argument("--balance-unit", default=None, choices=BALANCE_UNITS,
                   help=f"what --loss-balance balances: the tasks or the (domain, task) pairs; default {b.unit}")
    p.add_argument("--target-task", default=None,
                   help="metabalance: the task the others assist (default: the spec's first task)")
    p.add_argument("--gradnorm-alpha", type=float, default=None,
                   help=f"gradnorm: alpha, the pull towards equal training rates; default {b.alpha:g}")
    p.add_argument("--relax-factor", type=float, default=None,
                   help=f"metabalance: r in [0, 1], how far auxiliary gradients move to the target's magnitude; "
                        f"default {b.relax:g}")
    p.add_argument("--balance-beta", type=float, default=None,
                   help=f"metabalance: the gradient magnitudes' moving-average decay; default {b.beta:g}")
    p.add_argument("--embedding-optimizer", default=None, choices=EMBEDDING_OPTIMIZERS,
                   help="how the weight optimizer updates embedding tables: row_sparse (Adam on the batch's rows "
                        "only: a step costs the same whatever the vocabulary; moments of absent rows do not "
                        "decay), adam (Keras' Adam: every row every step), auto (row_sparse from "
                        f"{AUTO_ROWS:,} table rows); default {c.embedding_optimizer}")
    p.add_argument("--shuffle-buffer", type=int, default=None,
                   help="--data shards:DIR: the shuffle buffer, in records (memory: ~150 bytes each here); 0: "
                        "no shuffling, rows in file order (in-memory data too; for data shuffled already); "
                        f"default {c.shuffle_buffer:,}")
    p.add_argument("--eval-batch-size", type=int, default=None,
                   help=f"rows per batch when scoring validation and test data; default {c.eval_batch_size}")
    p.add_argument("--min-count", type=int, default=None,
                   help=f"ids seen fewer times in training go to the OOV bucket; default {c.min_count}")
    p.add_argument("--precision", default=None, choices=PRECISIONS,
                   help="'auto': mixed_bfloat16 on CPUs with native bfloat16 (AVX512_BF16/AMX), else float32; "
                        f"default {c.precision}")
    p.add_argument("--jit", action="store_true", default=None, help="XLA-compile the training steps")
    p.add_argument("--serving-precision", default=None, choices=SERVING_PRECISIONS,
                   help="the exported SavedModel's weights and arithmetic: float32 (any CPU or GPU) or bfloat16 "
                        "(half the size; faster only where the serving CPU/GPU has native bfloat16; "
                        f"metrics.json 'serving' gives its test AUC); default {c.serving_precision}")
    p.add_argument("--strategy-distribute", default=None, choices=DISTRIBUTE,
                   help="tf.distribute: 'mirrored' (this machine's devices) or 'multiworker' "
                        "(MultiWorkerMirroredStrategy; one process per worker, cluster from TF_CONFIG; "
                        f"--batch-size is the global batch); default {c.distribute}")


def cmd_compare(args) -> int:
    from mdmt_tf.models import ModelConfig, model_names
    from mdmt_tf.training.compare import Comparison, markdown

    names = [n.strip() for n in args.models.split(",") if n.strip()] if args.models != "all" else model_names()
    if not names:
        raise ConfigError("--models needs at least one model name (or 'all')")
    overrides = _key_values(args.param, "--param")
    models = [ModelConfig(name, dict(overrides)) for name in names]
    config = train_config_from_args(args)
    data = streamed_data(args, config.min_count) or load_data(args, config.min_count)
    source = f"{args.data} split={args.split} split_seed={args.split_seed}"
    report = Comparison(models, data, config, args.out, seeds=args.seeds,
                        source=source).run()
    print()
    print(markdown(report))
    print(f"wrote {args.out}/compare.md, compare.csv, compare.png, compare.json")
    return 0


def add_parsers(verbs) -> None:
    p = verbs.add_parser("train", help="train one model; write metrics.json, plots and a SavedModel",
                         formatter_class=DefaultsHelp)
    p.add_argument("--model", default=None, help="model name (m3oe, mmoe, ple, star, adi, m2m, aesm2, esmm, escm2, "
                                                 "...: README's model table; an unknown name lists them all)")
    add_data_flags(p)
    p.add_argument("--out", required=True, help="run directory; rerunning with the same one resumes")
    p.add_argument("--hparams", default=None, help="YAML/JSON model hyper-parameters (e.g. a tuner's best)")
    p.add_argument("--param", action="append", metavar="KEY=VALUE", help="override one hyper-parameter")
    add_training_flags(p)
    p.set_defaults(func=cmd_train)

    p = verbs.add_parser("compare", help="train several models over seeds on one split; table of test AUC "
                                         "(mean ± std per domain, task) incl. a popularity baseline",
                         formatter_class=DefaultsHelp)
    p.add_argument("--models", required=True, help="comma-separated model names, or 'all'")
    p.add_argument("--seeds", type=int, default=3, help="runs per model (seeds 0..N-1)")
    add_data_flags(p)
    p.add_argument("--out", required=True, help="output directory (runs are resumable)")
    p.add_argument("--param", action="append", metavar="KEY=VALUE",
                   help="hyper-parameter for every model (e.g. embedding_l2=1e-6, oov_rate=0.05)")
    add_training_flags(p)
    p.set_defaults(func=cmd_compare)

    p = verbs.add_parser("evaluate", help="recompute test metrics from a SavedModel")
    p.add_argument("--model-dir", required=True, help="a SavedModel written by mdmt train (DIR/model)")
    add_data_flags(p)
    p.add_argument("--which", default="test", choices=("train", "val", "test"))
    p.add_argument("--out", default=None, help="also write the metrics as JSON")
    p.set_defaults(func=cmd_evaluate)
