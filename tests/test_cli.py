import subprocess
import sys

import pytest

from mdmt_tf.cli import main

VERBS = ["data", "train", "compare", "evaluate", "tune", "pipeline", "serve", "predict", "export", "bench"]

def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "mdmt_tf", *args], capture_output=True, text=True, cwd=cwd)


def test_help_lists_every_verb():
    out = run_cli("--help")
    assert out.returncode == 0
    for verb in VERBS:
        assert f"    {verb} " in out.stdout


def test_data_synthetic_then_describe(tmp_path, capsys):
    assert main(["data", "synthetic", "--out", str(tmp_path), "--rows", "2000"]) == 0
    assert {p.name for p in tmp_path.iterdir()} == {"train.csv", "val.csv", "test.csv", "spec.yaml"}
    capsys.readouterr()
    assert main(["data", "describe", "--data", f"csv:{tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "| train | 0" in out and "vocabulary sizes" in out


def _table_rows(text: str) -> list[list[str]]:
    """The cells of each line of a markdown table in `text` (header and separator included)."""
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("|")]


def test_pipeline_summary_prints_domain_by_task_auc_table(capsys):
    """What `make run` ends with: one row per domain (spec order) plus (all), AUC and
    logloss columns per task, then the blessing and the push destination."""
    from types import SimpleNamespace

    from mdmt_tf.cli.pipeline import _print_summary
    from mdmt_tf.spec import DatasetSpec

    spec = DatasetSpec(domain="domain_id", tasks=("click", "like", "share"), sparse=("user_id",),
                       domains=("b", "c", "a"))
    auc, logloss = {}, {}
    for i, domain in enumerate(["a", "b", "c", "(all)"]):
        for j, task in enumerate(spec.tasks):
            auc[f"{domain}/{task}"] = 0.5 + 0.1 * i + 0.01 * j
            logloss[f"{domain}/{task}"] = 0.3 + 0.1 * i + 0.01 * j
    del auc["c/share"]  # a metric the Evaluator did not report
    summary = SimpleNamespace(auc=auc, logloss=logloss, blessed=True, pushed_to="/srv/models/mdmt/1700000000",
                              evaluation_uri=None,
                              component_seconds={"CsvExampleGen": 3.26, "mdmt.Trainer": 40.0})
    _print_summary(summary, spec)
    out = capsys.readouterr().out
    header, separator, *rows = _table_rows(out)
    assert header == ["domain", "click AUC", "like AUC", "share AUC", "click logloss", "like logloss",
                      "share logloss"]
    assert set("".join(separator)) == {"-"}
    assert [r[0] for r in rows] == ["b", "c", "a", "(all)"]
    by_domain = {r[0]: r[1:] for r in rows}
    assert by_domain["a"] == ["0.5000", "0.5100", "0.5200", "0.3000", "0.3100", "0.3200"]
    assert by_domain["(all)"][:3] == ["0.8000", "0.8100", "0.8200"]
    assert by_domain["c"][2] == "n/a" and by_domain["c"][5] == "0.5200"
    assert "blessed: True; pushed model: /srv/models/mdmt/1700000000" in out
    assert "component wall times: CsvExampleGen 3.3s, Trainer 40.0s" in out

    summary.blessed, summary.pushed_to = False, None
    _print_summary(summary, spec)
    assert "blessed: False; pushed model: not pushed" in capsys.readouterr().out


@pytest.mark.ml100k
def test_data_ml100k_writes_splits_and_spec(ml100k_dir, tmp_path, capsys):
    import pandas as pd

    from mdmt_tf.data.movielens import ML100K_SPEC
    from mdmt_tf.spec import DatasetSpec

    out = tmp_path / "ml"
    assert main(["data", "ml100k", "--src", str(ml100k_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote train/val/test.csv and spec.yaml to {out}" in printed
    assert {p.name for p in out.iterdir()} == {"train.csv", "val.csv", "test.csv", "spec.yaml"}
    assert DatasetSpec.from_yaml(out / "spec.yaml") == ML100K_SPEC
    sizes = {split: len(pd.read_csv(out / f"{split}.csv")) for split in ("train", "val", "test")}
    assert sizes == {"train": 80_000, "val": 10_000, "test": 10_000}
    train = pd.read_csv(out / "train.csv", dtype=str)
    assert set(ML100K_SPEC.columns) <= set(train.columns)
    assert set(train["domain_id"]) == {"<25", "25-34", ">=35"}
    # the summary table printed: one row per split x domain plus (all)
    rows = _table_rows(printed)
    assert [r[:3] for r in rows if r[1] == "(all)"] == [["train", "(all)", "80000"], ["val", "(all)", "10000"],
                                                        ["test", "(all)", "10000"]]


def test_user_errors_are_one_line_without_traceback(tmp_path):
    (tmp_path / "bad.csv").write_text("domain_id,user_id,click\n0,u1,3\n")
    (tmp_path / "spec.yaml").write_text("domain: domain_id\ntasks: [click]\nsparse: [user_id]\n")
    for args, fragment in [
        (["data", "describe", "--data", f"csv:{tmp_path / 'bad.csv'}"], "not 0 or 1"),
        (["data", "describe", "--data", "csv:/no/such/dir"], "does not exist"),
        (["data", "describe", "--data", "parquet:x"], "is not a data source"),
        (["data", "describe", "--data", f"csv:{tmp_path / 'bad.csv'}", "--spec", str(tmp_path / "x.yaml")],
         "does not exist"),
    ]:
        out = run_cli(*args)
        assert out.returncode == 2, out
        assert "Traceback" not in out.stderr
        assert out.stderr.strip().startswith("mdmt: error:") and fragment in out.stderr, out.stderr
    out = run_cli("data", "describe", "--no-such-flag")
    assert out.returncode == 2 and "unrecognized arguments" in out.stderr


@pytest.mark.slow
def test_setup_py_installs_the_mdmt_console_script(tmp_path):
    """`pip install .` provides the `mdmt` command (installed here into a target dir)."""
    import shutil

    from tests.conftest import REPO

    src = tmp_path / "src"  # build from a copy: pip builds in-tree and would litter the checkout
    for name in ("mdmt_tf", "components", "pipeline", "serving"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "setup.py", src / "setup.py")
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                           "--target", str(target), "-q", str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    script = target / "bin" / "mdmt"
    assert script.exists()
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, env=env,
                         cwd=tmp_path)
    assert out.returncode == 0 and "pipeline" in out.stdout, out.stderr


@pytest.mark.slow
def test_train_then_evaluate_reproduces_the_test_metrics(tmp_path):
    import json

    out = tmp_path / "run"
    proc = run_cli("train", "--model", "mmoe", "--data", "synthetic:3000", "--out", str(out), "--epochs", "1",
                   "--batch-size", "256", "--param", "expert_units=[16, 8]", "--param", "embedding_dim=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mmoe test: mean over (domain, task) pairs" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    proc = run_cli("evaluate", "--model-dir", str(out / "model"), "--data", "synthetic:3000",
                   "--out", str(tmp_path / "eval.json"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    evaluated = json.loads((tmp_path / "eval.json").read_text())["test"]
    for key, value in metrics["test"]["auc"].items():
        assert evaluated["auc"][key] == pytest.approx(value, abs=1e-6)
    bad = run_cli("train", "--model", "mmoe", "--data", "synthetic:3000", "--out", str(tmp_path / "x"),
                  "--param", "num_experts=zero")
    assert bad.returncode == 2
    assert "mdmt: error: mmoe: hyper-parameter num_experts='zero' must be an integer" in bad.stderr
