"""`mdmt export`, `mdmt predict` (both ways) and `mdmt serve --help`, through
mdmt_tf.cli.serve.add_parsers on a parser of our own (the verbs are not registered in
mdmt_tf.cli yet), with main()'s error handling: user errors -> one line, exit 2."""
from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
import pytest

from mdmt_tf.errors import MdmtError
from tests.serving.conftest import in_process


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    from mdmt_tf.cli import serve

    parser = argparse.ArgumentParser(prog="mdmt")
    serve.add_parsers(parser.add_subparsers(dest="verb", required=True))
    args = parser.parse_args(argv)
    try:
        code = int(args.func(args) or 0)
    except MdmtError as err:
        print(f"mdmt: error: {err}", file=__import__("sys").stderr)
        code = 2
    out = capsys.readouterr()
    return code, out.out, out.err


def test_serve_help_says_it_is_a_stand_in(capsys):
    with pytest.raises(SystemExit):
        run(["serve", "--help"], capsys)
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "DEVELOPMENT STAND-IN" in text and "production serves with TF Serving" in text
    for flag in ("--model-base-path", "--rest-port", "--grpc-port", "--poll-seconds", "--max-request-bytes",
                 "--max-request-rows", "--score-batch-rows", "--rest-workers", "--read-timeout", "--max-load-retries"):
        assert flag in text


def test_export_publishes_numbered_versions(models, tmp_path, capsys):
    base = tmp_path / "base"
    assert run(["export", "--model-dir", str(models[1]), "--base-path", str(base)], capsys)[0] == 0
    code, out, _ = run(["export", "--model-dir", str(models[2]), "--base-path", str(base)], capsys)
    assert code == 0 and "versions now: [1, 2]" in out
    assert (base / "2" / "saved_model.pb").exists()
    code, _, err = run(["export", "--model-dir", str(models[1]), "--base-path", str(base), "--version", "2"], capsys)
    assert code == 2 and err.startswith("mdmt: error:") and "exists already" in err and err.count("\n") == 1
    code, _, err = run(["export", "--model-dir", str(tmp_path), "--base-path", str(base)], capsys)
    assert code == 2 and "not a SavedModel" in err


def test_serve_refuses_a_missing_base_path(tmp_path, capsys):
    code, _, err = run(["serve", "--model-base-path", str(tmp_path / "nope")], capsys)
    assert code == 2 and "is not a directory" in err and "mdmt export" in err


@pytest.fixture(scope="module")
def data_file(rows, serving_data, tmp_path_factory):
    """The rows to score as a CSV in shuffled order, labels dropped."""
    from mdmt_tf.data.readers import write_csv

    shuffled = rows.sample(frac=1.0, random_state=3).reset_index(drop=True)
    path = tmp_path_factory.mktemp("predict") / "score.csv"
    write_csv(shuffled.drop(columns=list(serving_data.spec.tasks)), path)
    return path, shuffled


def _expected(models, shuffled, spec):
    from mdmt_tf.data.readers import example_bytes

    return in_process(models[1], example_bytes(shuffled, spec, with_labels=False))


def _check(out_csv, want, tasks):
    got = pd.read_csv(out_csv)
    assert list(got.columns) == list(tasks)
    assert len(got) == len(want[tasks[0]])
    for task in tasks:  # row i of the output is row i of the input
        np.testing.assert_allclose(got[task].to_numpy(), want[task], atol=1e-6)


@pytest.mark.parametrize("chunk", [[], ["--chunk-rows", "7"]])
def test_predict_with_model_dir(models, data_file, serving_data, tmp_path, capsys, chunk):
    """The file is read, scored and written a chunk at a time: the same predictions, in order."""
    path, shuffled = data_file
    out = tmp_path / "pred.csv"
    code, text, err = run(["predict", "--model-dir", str(models[1]), "--data", str(path), "--out", str(out), *chunk],
                          capsys)
    assert code == 0, err
    _check(out, _expected(models, shuffled, serving_data.spec), list(serving_data.spec.tasks))


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_predict_with_server(server, models, data_file, serving_data, tmp_path, capsys, protocol):
    path, shuffled = data_file
    out = tmp_path / "pred.csv"
    target = server.rest if protocol == "rest" else server.grpc
    code, text, err = run(["predict", "--server", target, "--protocol", protocol, "--data", str(path),
                           "--out", str(out), "--batch-rows", "7"], capsys)
    assert code == 0, err
    _check(out, _expected(models, shuffled, serving_data.spec), list(serving_data.spec.tasks))
    assert f"scored {len(shuffled)} rows" in text


def test_predict_tfrecord_with_explicit_spec(server, models, rows, serving_data, tmp_path, capsys):
    from mdmt_tf.data.readers import write_tfrecord

    data = tmp_path / "score.tfrecord"
    write_tfrecord(rows, data, serving_data.spec)
    spec = tmp_path / "spec.yaml"
    serving_data.spec.to_yaml(spec)
    out = tmp_path / "pred.csv"
    code, _, err = run(["predict", "--server", server.rest, "--spec", str(spec), "--data", str(data),
                        "--out", str(out), "--chunk-rows", "5"], capsys)
    assert code == 0, err
    _check(out, _expected(models, rows, serving_data.spec), list(serving_data.spec.tasks))


@pytest.mark.parametrize("argv,message", [
    (["--data", "x.csv", "--out", "o.csv"], "exactly one of --server"),
    (["--server", "127.0.0.1:1", "--model-dir", "m", "--data", "x.csv", "--out", "o.csv"], "exactly one of"),
    (["--server", "127.0.0.1:1", "--data", "x.csv", "--out", "o.csv", "--timeout", "1"], "UNAVAILABLE"),
    (["--model-dir", "/nonexistent", "--data", "x.csv", "--out", "o.csv"],
     "/nonexistent is not a SavedModel directory"),
])
def test_predict_user_errors(argv, message, capsys):
    code, _, err = run(["predict", *argv], capsys)
    assert code == 2 and err.startswith("mdmt: error:") and message in err, err


def test_predict_bad_data_names_the_row(server, data_file, tmp_path, capsys):
    path, shuffled = data_file
    bad = tmp_path / "bad.csv"
    table = pd.read_csv(path, dtype=str)
    table.loc[4, "age"] = "old"
    table.to_csv(bad, index=False)
    code, _, err = run(["predict", "--server", server.rest, "--data", str(bad), "--out", str(tmp_path / "o.csv"),
                        "--chunk-rows", "3"], capsys)
    assert code == 2 and "row 6" in err and "age" in err  # in the second chunk: the file's own line
    assert list(tmp_path.iterdir()) == [bad]  # no half-written predictions
