"""`mdmt pipeline compile --runner kubeflow` with remote URIs: nothing probed or written
locally, the URIs reach the compiled spec as given."""
import json

from mdmt_tf.cli import main
from mdmt_tf.data.synthetic import synthetic_spec

REMOTE = {"--data-root": "gs://bucket/mdmt/data", "--pipeline-root": "gs://bucket/mdmt/root",
          "--serving-dir": "s3://bucket/mdmt/serving"}


def _compile(tmp_path, *extra):
    spec = tmp_path / "spec.yaml"
    synthetic_spec().to_yaml(spec)
    out = tmp_path / "kfp" / "pipeline.json"
    argv = ["pipeline", "compile", "--runner", "kubeflow", "--out", str(out), "--root", str(tmp_path / "local"),
            "--spec", str(spec), "--image", "example.com/mdmt:test", *[x for kv in REMOTE.items() for x in kv],
            *extra]
    return main(argv), out


def test_remote_uris_compile_without_being_probed(tmp_path):
    code, out = _compile(tmp_path, "--data-format", "tfrecord")
    assert code == 0
    text = out.read_text()
    for uri in REMOTE.values():
        assert uri in text, uri
    job = json.loads(text)
    assert job["runtimeConfig"]["gcsOutputDirectory"] == "gs://bucket/mdmt/root"
    # the data root is read as train* / val* / test* files by ImportExampleGen (tfrecord)
    assert "ImportExampleGen" in text and all(f'{stem}*' in text for stem in ("train", "val", "test"))
    assert not (tmp_path / "local").exists()  # no synthetic data written, nothing created locally


def test_a_remote_data_root_needs_its_format(tmp_path, capsys):
    code, out = _compile(tmp_path)
    assert code == 2 and not out.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gs://bucket/mdmt/data is remote" in err[0] and "--data-format" in err[0]
