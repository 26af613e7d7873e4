"""Every registered model family: its search space declares, and `build(hp)` returns the
library trainer around a model whose config is the hyper-parameters' values (no training)."""
import keras_tuner as kt
import pytest

from mdmt_tf.models import MODELS, model_names
from mdmt_tf.training.trainer import MDMTTrainer
from mdmt_tf.tuning.hypermodel import SPACES, MDMTHyperModel, split_values
from tests.tuning.conftest import CONFIG


def _last_values(hp: kt.HyperParameters) -> dict:
    """The last choice / upper bound of every hyper-parameter: values unlike the defaults."""
    out = {}
    for p in hp.space:
        if isinstance(p, kt.engine.hyperparameters.Choice):
            out[p.name] = p.values[-1]
        elif isinstance(p, (kt.engine.hyperparameters.Int, kt.engine.hyperparameters.Float)):
            out[p.name] = p.max_value
    return out


def _check(trainer, hp, name):
    assert isinstance(trainer, MDMTTrainer)
    net = trainer.net
    assert type(net) is MODELS[name][0] and net.name == name
    params, train = split_values(hp.values)
    config = net.get_config()["params"]
    for key, value in {**MODELS[name][1], **params}.items():  # the preset (m3oe_aftb: gating) and the hp values
        got = config[key]
        assert (list(got) if isinstance(got, tuple) else got) == value, (name, key, got, value)
    assert float(trainer.weight_optimizer.learning_rate) == pytest.approx(train["learning_rate"])
    if net.architecture_variables:
        assert trainer.arch_mode == train["arch_mode"]
        assert float(trainer.arch_optimizer.learning_rate) == pytest.approx(train["arch_learning_rate"])
    else:
        assert "arch_mode" not in train
    return net.count_params()


@pytest.mark.parametrize("name", model_names())
def test_every_family_builds_from_its_hyperparameters(tuning_data, name):
    _, encoded = tuning_data
    assert set(SPACES) == set(model_names())
    hypermodel = MDMTHyperModel(name, encoded, CONFIG)

    defaults = kt.HyperParameters()  # build() declares the space: every value its default
    sizes = [_check(hypermodel.build(defaults), defaults, name)]
    assert defaults.values["embedding_dim"] == 8 and "train.learning_rate" in defaults.values

    others = kt.HyperParameters()
    hypermodel.declare(others)
    others.values.update(_last_values(others))
    assert others.values != defaults.values
    sizes.append(_check(hypermodel.build(others), others, name))
    assert others.values["embedding_dim"] == 32 and sizes[0] != sizes[1]  # the values reach the layers
