"""`mdmt pipeline run` and `mdmt pipeline compile` (the TFX pipeline lives in pipeline/)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from mdmt_tf._project import project_module
from mdmt_tf.errors import ConfigError, DataError, MdmtError


def prepare_data(source: str, root: Path, spec_path: str | None) -> tuple[str, dict]:
    """--data -> (a directory ExampleGen reads, the spec as a dict). Synthetic and ML-100K
    sources are written once as CSV under ROOT/data and reused (so TFX's cache hits)."""
    from mdmt_tf.data.readers import random_split, write_csv
    from mdmt_tf.data.sources import parse_source, resolve_spec

    kind, rest = parse_source(source)
    if kind in ("csv", "tfrecord"):
        path = Path(rest)
        if not path.exists():
            raise DataError("does not exist", source=str(path))
        return str(path), resolve_spec(path, spec_path).to_dict()
    if kind == "synthetic":
        from mdmt_tf.data.synthetic import SyntheticConfig, generate, synthetic_spec

        config = SyntheticConfig(rows=int(rest)) if rest else SyntheticConfig()
        out = root / "data" / f"synthetic-{config.rows}"
        spec = synthetic_spec(config)
        if not (out / "test.csv").exists():
            for split, table in random_split(generate(config), 0, "synthetic").items():
                out.mkdir(parents=True, exist_ok=True)
                write_csv(table, out / f"{split}.csv")
        return str(out), spec.to_dict()
    from mdmt_tf.data.movielens import ML100K_SPEC, convert_ml100k

    out = root / "data" / "ml100k"
    if not (out / "test.csv").exists():
        convert_ml100k(rest, out)
    return str(out), ML100K_SPEC.to_dict()


def build_config(args, for_cluster: bool = False):
    PipelineConfig = project_module("pipeline.config").PipelineConfig

    root = Path(args.root)
    base = yaml.safe_load(Path(args.config).read_text()) if args.config else {}
    if args.config and not isinstance(base, dict):
        raise ConfigError(f"{args.config} must hold a mapping of pipeline settings")
    given_root = getattr(args, "data_root", None)
    if given_root and not args.data:  # compile: the cluster's data; nothing written or probed here
        if args.spec:
            from mdmt_tf.spec import DatasetSpec

            base["spec"] = DatasetSpec.from_yaml(args.spec).to_dict()
        elif "spec" not in base:
            raise ConfigError(f"--data-root {given_root} needs the dataset spec: --spec SPEC.yaml (a local file) "
                              "or `spec` in --config")
    elif args.data or "data_root" not in base:
        data_root, spec = prepare_data(args.data or "synthetic", root, args.spec)
        base.update(data_root=data_root, spec=spec)
    if getattr(args, "data_format", None):
        base["data_format"] = args.data_format
    if getattr(args, "workers", None):
        base["tfjob"] = {**base.get("tfjob", {}), "workers": args.workers}
    base.setdefault("pipeline_root", str(root / "root"))
    base.setdefault("metadata_path", str(root / "metadata.sqlite"))
    base.setdefault("serving_dir", str(root / "serving"))
    if args.model:
        base["model"] = {"name": args.model, "params": base.get("model", {}).get("params", {})}
    if args.epochs is not None:
        base["train"] = {**base.get("train", {}), "epochs": args.epochs}
    if getattr(args, "tune", False):
        base["tune"] = True
    for key in ("pipeline_root", "data_root", "serving_dir"):
        value = getattr(args, key, None)
        if value:
            base[key] = value
    return PipelineConfig.from_dict(base)


def _print_summary(summary, spec) -> None:
    from mdmt_tf.report.tables import markdown_table

    domains = sorted({k.rsplit("/", 1)[0] for k in summary.auc if not k.startswith("(all)")},
                     key=lambda d: (list(spec.domains).index(d) if spec.domains and d in spec.domains else 0, d))
    rows = [[d] + [_fmt(summary.auc.get(f"{d}/{t}")) for t in spec.tasks]
            + [_fmt(summary.logloss.get(f"{d}/{t}")) for t in spec.tasks] for d in domains + ["(all)"]]
    print("\nEvaluator (test split): AUC and logloss per domain x task")
    print(markdown_table(["domain"] + [f"{t} AUC" for t in spec.tasks] + [f"{t} logloss" for t in spec.tasks], rows))
    print(f"\nblessed: {summary.blessed}; pushed model: {summary.pushed_to or 'not pushed'}")
    times = ", ".join(f"{name.rsplit('.', 1)[-1]} {s:.1f}s" for name, s in summary.component_seconds.items())
    print(f"component wall times: {times}")


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def cmd_run(args) -> int:
    if args.runner != "local":
        raise ConfigError("`mdmt pipeline run` runs locally; for Kubeflow use "
                          "`mdmt pipeline compile --runner kubeflow`")
    config = build_config(args)
    run = project_module("pipeline.local_runner").run
    DataAnomaliesError = project_module("pipeline.schema_rules").DataAnomaliesError

    try:
        summary = run(config, beam_args=args.beam_arg)
    except DataError:  # the inputs' pre-flight check: file, line and column named
        raise
    except Exception as err:  # a component failed: say which and why, in one line when it is the data
        cause = _find(err, DataAnomaliesError)
        if cause is not None:
            raise DataError(str(cause)) from None
        print(f"mdmt: pipeline failed: {type(err).__name__}: {str(err).splitlines()[0][:500]} "
              f"(component logs above; metadata in {config.metadata_path})", file=sys.stderr)
        return 1
    _print_summary(summary, config.dataset_spec)
    return 0


def _find(err: BaseException, kind: type) -> BaseException | None:
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, kind) or type(err).__name__ == kind.__name__:
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def cmd_tfjob_worker(args) -> int:
    project_module("pipeline.tfjob").run_worker(args.fn_args)
    return 0


def cmd_compile(args) -> int:
    if args.runner != "kubeflow":
        raise ConfigError("only `--runner kubeflow` compiles; `mdmt pipeline run --runner local` runs locally")
    config = build_config(args, for_cluster=True)
    compile_pipeline = project_module("pipeline.kubeflow_runner").compile_pipeline

    path = compile_pipeline(config, args.out, image=args.image)
    print(f"wrote the KFP v2 pipeline spec {path} (image {args.image or config.kubeflow_image})")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    from mdmt_tf.data.sources import USAGE

    p.add_argument("--config", default=None, help="pipeline config YAML (see pipeline/config.py)")
    p.add_argument("--data", default=None, help=f"{USAGE} (default synthetic, or the config's data_root)")
    p.add_argument("--spec", default=None, help="dataset spec YAML for csv/tfrecord data")
    p.add_argument("--root", default="runs/pipeline", help="pipeline root, metadata and serving dir go under it")
    p.add_argument("--model", default=None, help="model name (default: the config's, else m3oe)")
    p.add_argument("--epochs", type=int, default=None)


def add_parsers(verbs) -> None:
    pipeline = verbs.add_parser("pipeline", help="run or compile the TFX pipeline (local / Kubeflow)")
    actions = pipeline.add_subparsers(dest="pipeline_verb", metavar="ACTION", required=True)
    p = actions.add_parser("run", help="run the pipeline with LocalDagRunner (Beam DirectRunner in_memory)")
    p.add_argument("--runner", default="local", choices=("local",))
    _common(p)
    p.add_argument("--tune", action="store_true", help="run the Tuner before the Trainer")
    p.add_argument("--beam-arg", action="append", default=[], metavar="ARG",
                   help="extra Beam pipeline argument, e.g. --beam-arg=--direct_num_workers=2")
    p.set_defaults(func=cmd_run)
    p = actions.add_parser("tfjob-worker", help="(inside a TFJob pod) one worker of the pipeline's multi-worker "
                                                "Trainer: run the module file's run_fn on the saved FnArgs")
    p.add_argument("--fn-args", required=True, help="the FnArgs JSON the TFJob Trainer wrote (any TF filesystem)")
    p.set_defaults(func=cmd_tfjob_worker)
    p = actions.add_parser("compile", help="compile a KFP v2 pipeline spec (JSON) for Kubeflow, offline")
    p.add_argument("--runner", required=True, choices=("kubeflow",))
    p.add_argument("--out", required=True, help="output JSON file")
    p.add_argument("--image", default=None, help="container image of the steps (pipeline/Dockerfile)")
    p.add_argument("--pipeline-root", default=None, help="e.g. gs://bucket/mdmt/root")
    p.add_argument("--data-root", default=None, help="e.g. gs://bucket/mdmt/data")
    p.add_argument("--serving-dir", default=None, help="e.g. gs://bucket/mdmt/serving")
    p.add_argument("--workers", type=int, default=None,
                   help="train with N workers as a Kubeflow Training Operator TFJob (the config's `tfjob` settings "
                        "for the rest: namespace, image, resources)")
    p.add_argument("--data-format", default=None, choices=("csv", "tfrecord"),
                   help="the data's format; needed for a remote --data-root (never probed), which must hold "
                        "train*, val* and test* files")
    _common(p)
    p.set_defaults(func=cmd_compile)


__all__ = ["add_parsers", "MdmtError"]
