import pytest

from mdmt_tf.data.dataset import MDMTData
from mdmt_tf.data.readers import Splits, random_split
from mdmt_tf.data.synthetic import SyntheticConfig, generate, synthetic_spec
from mdmt_tf.training.config import TrainConfig
from mdmt_tf.training.encoded import EncodedData

SMALL = {"embedding_dim": 4, "expert_units": "128,32"}
CONFIG = TrainConfig(epochs=2, batch_size=512, patience=2, precision="float32")


@pytest.fixture(scope="package")
def tuning_data():
    config = SyntheticConfig(rows=6000, users=400, items=300, seed=5)
    parts = random_split(generate(config), 0, "synthetic")
    data = MDMTData.build(synthetic_spec(config), Splits(**parts, sources={s: s for s in parts}))
    return data, EncodedData.from_data(data)
