"""ESMM's cascade needs nested training labels: `mdmt train` stops on unnested ones unless
allow_unnested=true; the pipeline's path (Run on EncodedData) stops too."""
import dataclasses
import json

import numpy as np
import pytest

from mdmt_tf.cli import main
from mdmt_tf.errors import DataError
from mdmt_tf.models import ModelConfig
from mdmt_tf.training.config import TrainConfig
from mdmt_tf.training.encoded import EncodedData
from mdmt_tf.training.fit import Run
from tests.data.test_checks import _click_zero_positions, unnest_csv

SMALL = ["--epochs", "1", "--batch-size", "512", "--precision", "float32", "--param", "embedding_dim=4",
         "--param", "tower_units=[8]"]


def test_mdmt_train_esmm_on_unnested_labels_is_a_one_line_error(csv_dir, tmp_path, capsys):
    lines = unnest_csv(csv_dir, _click_zero_positions(csv_dir, 3))
    out = tmp_path / "run"
    assert main(["train", "--model", "esmm", "--data", f"csv:{csv_dir}", "--out", str(out), *SMALL]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        f"mdmt: error: {csv_dir / 'train.csv'}, row {lines[0]}: like=1 but click=0 (2 more row(s) like it); "
        "model esmm is a cascade click -> like and needs nested labels (every like is a click). Fix the labels, "
        "or pass --param allow_unnested=true to train it anyway")
    assert not (out / "model").exists() and not (out / "checkpoints").exists()
    assert not (out / "run_config.json").exists()  # so the rerun the message suggests is not refused

    allowed = out
    assert main(["train", "--model", "esmm", "--data", f"csv:{csv_dir}", "--out", str(allowed), *SMALL,
                 "--param", "allow_unnested=true"]) == 0
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if "not nested" in line]
    assert len(notes) == 1 and notes[0].startswith("[mdmt] esmm: the training labels are not nested: 3 of ")
    metrics = json.loads((allowed / "metrics.json").read_text())
    assert metrics["model_config"]["params"]["allow_unnested"] is True and (allowed / "model").is_dir()


def test_pipeline_path_names_the_training_example(small_data, tmp_path):
    """The pipeline's Trainer runs Run on EncodedData (no source rows): the check names the
    1-based position in the training split."""
    enc = EncodedData.from_data(small_data)
    labels = {t: v.copy() for t, v in enc.labels["train"].items()}
    first = int(np.flatnonzero(labels["click"] == 0)[10])
    labels["like"][first] = 1
    enc = dataclasses.replace(enc, labels={**enc.labels, "train": labels})
    with pytest.raises(DataError, match=rf"^training example {first + 1}: like=1 but click=0; model esmm is a "
                                        "cascade click -> like"):
        Run(ModelConfig("esmm", {"embedding_dim": 4}), enc, TrainConfig(epochs=1, precision="float32"),
            tmp_path / "run", export=False, plots=False).run()
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "run_config.json").exists()
