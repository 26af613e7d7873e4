"""Embedding tables at production size: lookups that read only their rows, and RowSparseAdam,
which updates only the rows a batch touched."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from mdmt_tf.layers import FieldEmbedding
from mdmt_tf.models import build_model
from mdmt_tf.training.optimizers import RowSparseAdam, weight_optimizer
from mdmt_tf.training.options import AUTO_ROWS
from mdmt_tf.training.trainer import MDMTTrainer
from tests.training.conftest import batches

LR, B1, B2, EPS = 0.01, 0.9, 0.999, 1e-7


def _pair(table):
    """Two variables holding `table`, one for Adam and one for RowSparseAdam."""
    return keras.Variable(table.copy()), keras.Variable(table.copy())


def _slices(values, ids, rows):
    return tf.IndexedSlices(tf.constant(values, tf.float32), tf.constant(ids, tf.int32),
                            dense_shape=tf.constant([rows, values.shape[1]], tf.int32))


def test_equals_adam_when_every_row_is_touched():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(5, 3)).astype("float32")
    dense_var, sparse_var = _pair(table)
    adam, sparse = keras.optimizers.Adam(LR), RowSparseAdam(LR)
    for _ in range(4):
        ids = np.array([0, 1, 2, 3, 4, 2, 0])  # every row, two of them twice
        grads = rng.normal(size=(len(ids), 3)).astype("float32")
        adam.apply([tf.convert_to_tensor(_slices(grads, ids, 5))], [dense_var])
        sparse.apply([_slices(grads, ids, 5)], [sparse_var])
    np.testing.assert_allclose(sparse_var.numpy(), dense_var.numpy(), rtol=0, atol=1e-6)
    assert not np.allclose(sparse_var.numpy(), table)


def test_touches_only_the_batch_rows_with_adams_rule():
    """One step from zero moments, written out: m = (1-b1) g, v = (1-b2) g^2, and the row moves
    by lr sqrt(1-b2) / (1-b1) * m / (sqrt(v) + eps); an id given twice sums its rows. Rows not
    in the batch keep their values and their (zero) moments: Adam would move none of them on
    a first step either, but on a later step it would keep moving them by their momentum."""
    table = np.arange(12, dtype="float32").reshape(4, 3)
    var = keras.Variable(table.copy())
    opt = RowSparseAdam(LR)
    grads = np.array([[1.0, -2.0, 0.5], [3.0, 1.0, -1.0], [1.0, 1.0, 1.0]], "float32")
    opt.apply([_slices(grads, [2, 0, 2], 4)], [var])
    g = np.zeros((4, 3), "float32")
    g[2] = grads[0] + grads[2]
    g[0] = grads[1]
    m, v = (1 - B1) * g, (1 - B2) * g ** 2
    expected = table - LR * np.sqrt(1 - B2) / (1 - B1) * m / (np.sqrt(v) + EPS)
    expected[[1, 3]] = table[[1, 3]]
    np.testing.assert_allclose(var.numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(opt._momentums[0].numpy(), m, rtol=1e-6)
    np.testing.assert_allclose(opt._velocities[0].numpy(), v, rtol=2e-5)  # 1 - b2 rounded in float32

    # a second step on row 0 only: rows 2's value and moments stay as they were
    m2_before = opt._momentums[0].numpy().copy()
    after_first = var.numpy().copy()
    opt.apply([_slices(np.ones((1, 3), "float32"), [0], 4)], [var])
    np.testing.assert_array_equal(var.numpy()[[1, 2, 3]], after_first[[1, 2, 3]])
    np.testing.assert_array_equal(opt._momentums[0].numpy()[2], m2_before[2])
    assert not np.array_equal(var.numpy()[0], after_first[0])


def test_a_dense_gradient_is_adam():
    rng = np.random.default_rng(1)
    dense_var, sparse_var = _pair(rng.normal(size=(4, 2)).astype("float32"))
    adam, sparse = keras.optimizers.Adam(LR), RowSparseAdam(LR)
    for _ in range(3):
        grad = tf.constant(rng.normal(size=(4, 2)).astype("float32"))
        adam.apply([grad], [dense_var])
        sparse.apply([grad], [sparse_var])
    np.testing.assert_array_equal(sparse_var.numpy(), dense_var.numpy())


def test_serializes_and_refuses_amsgrad():
    opt = RowSparseAdam(0.003, beta_1=0.8)
    again = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert isinstance(again, RowSparseAdam) and again.beta_1 == 0.8
    assert float(again.learning_rate) == pytest.approx(0.003)
    with pytest.raises(Exception, match="amsgrad"):
        RowSparseAdam(amsgrad=True)


def test_auto_chooses_row_sparse_from_the_threshold():
    assert type(weight_optimizer("auto", 1e-3, AUTO_ROWS - 1)) is keras.optimizers.Adam
    assert type(weight_optimizer("auto", 1e-3, AUTO_ROWS)) is RowSparseAdam
    assert type(weight_optimizer("adam", 1e-3, 10 ** 8)) is keras.optimizers.Adam
    assert type(weight_optimizer("row_sparse", 1e-3, 10)) is RowSparseAdam


def _consumers_of(graph, variable):
    """Op types in `graph` that take `variable`'s resource handle as an input."""
    handle = variable.value.handle
    internal = [inner for outer, inner in graph.captures if outer is handle]
    assert internal, f"{variable.path} is not captured by the step"
    return {op.type for op in graph.get_operations() if any(t is internal[0] for t in op.inputs)}


@pytest.mark.parametrize("model_name, precision, tables", [
    ("mmoe", "float32", "concat"), ("mmoe", "mixed_bfloat16", "concat"), ("m3oe", "float32", "concat"),
    ("m3oe", "mixed_bfloat16", "concat"), ("mmoe", "mixed_bfloat16", "per_field")])
def test_the_compiled_train_step_reads_no_whole_table(enc, model_name, precision, tables):
    """The embedding tables and their Adam moments are only gathered from and scattered into:
    no ReadVariableOp (a whole-table read) and no AssignVariableOp (a whole-table write)."""
    keras.utils.set_random_seed(0)
    model = build_model(model_name, enc.schema, {"embedding_dim": 4, "embedding_tables": tables}, dtype=precision)
    trainer = MDMTTrainer(model, arch_mode="joint", weight_optimizer=RowSparseAdam(1e-3))
    trainer.compile()
    features, labels = next(iter(batches(enc, "train", 64)))
    graph = tf.function(trainer.train_step).get_concrete_function((features, labels)).graph
    fields = len(enc.schema.sparse) + 1  # the domain indicator is embedded too
    assert len(model.embedding_tables) == (1 if tables == "concat" else fields)
    row_ops = {"ResourceGather", "ResourceScatterUpdate", "ResourceScatterSub", "ResourceScatterAdd"}
    opt = trainer.weight_optimizer
    for table in model.embedding_tables:
        index = opt._get_variable_index(table)
        for variable in (table, opt._momentums[index], opt._velocities[index]):
            used = _consumers_of(graph, variable)
            assert used and used <= row_ops, (variable.path, sorted(used))


def test_a_mirrored_step_reads_no_whole_table(enc):
    """Under a tf.distribute strategy the tables and moments are MirroredVariables, whose own
    gather reads them whole (a 10M-row table made a MultiWorkerMirrored step 50x slower): the
    replica step gathers from each device's copy; the gradient still updates the table."""
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = build_model("mmoe", enc.schema, {"embedding_dim": 4}, dtype="float32")
        trainer = MDMTTrainer(model, arch_mode="joint", weight_optimizer=RowSparseAdam(1e-2))
        trainer.compile()
    data = batches(enc, "train", 64).take(1)
    before = model.embedding_tables[0].numpy().copy()
    trainer.fit(data, epochs=1, verbose=0)  # builds the optimizer's moments
    moved = np.abs(model.embedding_tables[0].numpy() - before).sum(1) > 0
    features, _ = next(iter(data))
    assert 0 < moved.sum() < len(moved)  # some rows moved, and only rows of the batch

    distributed = iter(strategy.experimental_distribute_dataset(data))
    step = tf.function(lambda it: strategy.run(trainer.train_step, args=(next(it),)))
    graph = step.get_concrete_function(distributed).graph
    row_ops = {"ResourceGather", "ResourceScatterUpdate", "ResourceScatterSub", "ResourceScatterAdd"}
    opt = trainer.weight_optimizer
    table = model.embedding_tables[0]
    index = opt._get_variable_index(table)
    for variable in (table, opt._momentums[index], opt._velocities[index]):
        handle = variable.value._get_on_device_or_primary().handle
        internal = [inner for outer, inner in graph.captures if outer is handle]
        used = {op.type for op in graph.get_operations() if any(t is internal[0] for t in op.inputs)}
        assert used and used <= row_ops, (variable.path, sorted(used))


def test_per_field_tables_look_up_the_same_rows():
    vocab = {"a": 3, "b": 4}
    one = FieldEmbedding(vocab, 2, embeddings_initializer="glorot_uniform")
    split = FieldEmbedding(vocab, 2, tables="per_field")
    one.build(), split.build()
    table = one.embeddings.numpy()
    split.field_tables["a"].assign(table[:3])
    split.field_tables["b"].assign(table[3:])
    ids = {"a": np.array([0, 2, 1]), "b": np.array([3, 0, 1])}
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(split(ids)), keras.ops.convert_to_numpy(one(ids)))
    assert [tuple(v.shape) for v in split.table_variables] == [(3, 2), (4, 2)]
    again = FieldEmbedding.from_config(split.get_config())
    assert again.tables == "per_field" and again.offsets == {"a": 0, "b": 0}
    with pytest.raises(ValueError, match="tables"):
        FieldEmbedding(vocab, 2, tables="sharded")


def test_mixed_precision_lookup_casts_rows_not_the_table():
    layer = FieldEmbedding({"a": 5}, 3, dtype="mixed_bfloat16")
    out = layer({"a": np.array([1, 4])})
    assert layer.embeddings.dtype == "float32" and out.dtype == "bfloat16"
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(keras.ops.cast(out[:, 0], "float32")),
                                  tf.cast(tf.cast(layer.embeddings.numpy()[[1, 4]], tf.bfloat16), tf.float32).numpy())


def test_row_sparse_is_refused_with_a_mamdr_strategy():
    from mdmt_tf.errors import ConfigError
    from mdmt_tf.training.config import TrainConfig

    assert TrainConfig(strategy="dr").embedding_optimizer == "auto"  # auto: MAMDR keeps Adam
    with pytest.raises(ConfigError, match="row_sparse applies to --strategy plain"):
        TrainConfig(strategy="dr", embedding_optimizer="row_sparse")
