"""A trainer checkpoint (what `mdmt train` resumes from and restores its best epoch from)
holds every variable of every model, non-trainable ones included: ADI's domain-specific
batch norms once kept their moving statistics in a Keras list of layers, which TF's
checkpoints do not track (trainable variables still came back through the optimizer), so a
resumed ADI run served with initial statistics. RNG states (seed generators) are left out:
they are not restored on resume (a resumed run draws new noise)."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from mdmt_tf.models import build_model, model_names
from mdmt_tf.training.trainer import MDMTTrainer
from tests.training.conftest import values


def _batch(enc, rows=192):
    return {k: tf.constant(v[:rows]) for k, v in enc.features["train"].items()}


@pytest.mark.parametrize("name", model_names())
def test_a_trainer_checkpoint_restores_every_variable(enc, name, tmp_path):
    keras.utils.set_random_seed(0)
    model = build_model(name, enc.schema)
    for _ in range(3):  # training passes move moving statistics (STAR's, ADI's norms)
        model(_batch(enc), training=True)
    if len(model.stages) > 1:
        model.set_stage(len(model.stages) - 1)
    path = tf.train.Checkpoint(trainer=MDMTTrainer(model)).save(str(tmp_path / "ckpt"))

    keras.utils.set_random_seed(1)
    fresh = build_model(name, enc.schema)
    tf.train.Checkpoint(trainer=MDMTTrainer(fresh)).restore(path).expect_partial()
    kept = [i for i, v in enumerate(model.variables) if "seed" not in v.path]
    saved, restored = values(model.variables), values(fresh.variables)
    for i in kept:
        np.testing.assert_array_equal(restored[i], saved[i], err_msg=model.variables[i].path)
    out, back = model(_batch(enc)), fresh(_batch(enc))
    for task in out:
        np.testing.assert_array_equal(np.asarray(back[task]), np.asarray(out[task]))
