"""FieldEmbedding: one embedding table per categorical field, looked up row-wise."""
from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops

from mdmt_tf.layers._util import check_positive_int, register, row_source


@register
class FieldEmbedding(keras.layers.Layer):
    """Embeds several categorical fields: {field: ids [B]} -> [B, num_fields, dim].

    By default the per-field tables are stored as one concatenated table with per-field
    offsets, so a batch costs one gather whatever the number of fields; `tables="per_field"`
    keeps one weight per field (`embeddings_<field>`), e.g. to give a huge field its own
    table. Id 0 of every field is its OOV bucket (see mdmt_tf.preprocessing). Ids must lie
    in [0, vocab_size): the preprocessing front guarantees it; ids out of range are not
    checked here.

    A lookup reads only the looked-up rows (ResourceGather on the variable), so its gradient
    is row-sparse (`tf.IndexedSlices`) and a step costs the same whatever the table size;
    mdmt_tf.training.optimizers.RowSparseAdam then updates only those rows. The tables are
    kept in float32 under a mixed policy and the looked-up rows cast to the compute dtype
    (casting the table instead would read and convert all of it every step). Inside a Keras
    stateless call (MAMDR's theta + theta_d) the table is a plain tensor and the lookup a
    dense gather.

    Args:
      vocab_sizes: {field: number of ids including OOV}; the order is the output order.
      dim: embedding size.
      l2: L2 penalty on the looked-up rows (mean over the batch), added with add_loss.
      oov_rate: in training, each id of the `oov_fields` is replaced by the OOV id 0 with
        this probability, so the OOV embedding is trained for cold-start ids.
      oov_fields: fields `oov_rate` applies to (e.g. user_id, item_id).
      tables: "concat" (one table, the default) or "per_field".
    """

    TABLES = ("concat", "per_field")

    def __init__(self, vocab_sizes, dim, l2=0.0, oov_rate=0.0, oov_fields=(),
                 embeddings_initializer="uniform", seed=None, tables="concat", **kwargs):
        super().__init__(**kwargs)
        if not vocab_sizes:
            raise ValueError("FieldEmbedding: `vocab_sizes` must name at least one field, received {}")
        self.vocab_sizes = {str(k): check_positive_int(v, f"vocab_sizes[{k!r}]", "FieldEmbedding")
                            for k, v in dict(vocab_sizes).items()}
        self.dim = check_positive_int(dim, "dim", "FieldEmbedding")
        if isinstance(oov_fields, str):
            raise ValueError(f"FieldEmbedding: `oov_fields` must be a list of field names, received {oov_fields!r}")
        try:
            self.l2, self.oov_rate = float(l2), float(oov_rate)
        except (TypeError, ValueError):
            raise ValueError(f"FieldEmbedding: `l2` and `oov_rate` must be numbers, received l2={l2!r}, "
                             f"oov_rate={oov_rate!r}") from None
        if self.l2 < 0:
            raise ValueError(f"FieldEmbedding: `l2` must be >= 0, received l2={l2!r}")
        if not 0.0 <= self.oov_rate < 1.0:
            raise ValueError(f"FieldEmbedding: `oov_rate` must be in [0, 1), received oov_rate={oov_rate!r}")
        unknown = [f for f in oov_fields if f not in self.vocab_sizes]
        if unknown:
            raise ValueError(f"FieldEmbedding: `oov_fields` {unknown} are not fields; valid: {list(self.vocab_sizes)}")
        self.oov_fields = tuple(oov_fields)
        if tables not in self.TABLES:
            raise ValueError(f"FieldEmbedding: `tables` must be one of {list(self.TABLES)}, received {tables!r}")
        self.tables = tables
        self.embeddings_initializer = keras.initializers.get(embeddings_initializer)
        self.seed = seed
        self._seed_generator = keras.random.SeedGenerator(seed) if self.oov_rate else None
        offsets, total = {}, 0
        for field, size in self.vocab_sizes.items():
            offsets[field] = total if tables == "concat" else 0
            total += size
        self.offsets, self.total = offsets, total

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(self.vocab_sizes)

    def build(self, input_shape=None):
        # autocast off: a mixed policy casts the looked-up rows, never the whole table
        if self.tables == "concat":
            self.embeddings = self.add_weight(name="embeddings", shape=(self.total, self.dim),
                                              initializer=self.embeddings_initializer, autocast=False)
            self.field_tables = {}
        else:
            self.field_tables = {
                field: self.add_weight(name=f"embeddings_{field}", shape=(size, self.dim),
                                       initializer=self.embeddings_initializer, autocast=False)
                for field, size in self.vocab_sizes.items()}

    @property
    def table_variables(self) -> list:
        """The embedding tables (one, or one per field)."""
        return list(self.field_tables.values()) if self.field_tables else [self.embeddings]

    def call(self, ids, training=None):
        columns = []
        for field in self.vocab_sizes:
            column = ops.cast(ids[field], "int32")
            if training and self.oov_rate and field in self.oov_fields:
                keep = keras.random.uniform(ops.shape(column), seed=self._seed_generator) >= self.oov_rate
                column = ops.where(keep, column, ops.zeros_like(column))
            columns.append(column + self.offsets[field])
        if self.field_tables:
            embedded = ops.stack([_rows(self.field_tables[f], c) for f, c in zip(self.vocab_sizes, columns)],
                                 axis=1)
        else:
            embedded = _rows(self.embeddings, ops.stack(columns, axis=1))
        embedded = ops.cast(embedded, self.compute_dtype)
        if self.l2:  # in float32, whatever the compute dtype (it is summed with the float32 task loss)
            rows = ops.cast(embedded, "float32")
            batch = ops.cast(ops.shape(rows)[0], "float32")
            self.add_loss(self.l2 * ops.sum(ops.square(rows)) / ops.maximum(batch, 1.0))
        return embedded

    def get_config(self):
        return {**super().get_config(), "vocab_sizes": dict(self.vocab_sizes), "dim": self.dim, "l2": self.l2,
                "oov_rate": self.oov_rate, "oov_fields": list(self.oov_fields), "seed": self.seed,
                "tables": self.tables,
                "embeddings_initializer": keras.initializers.serialize(self.embeddings_initializer)}


def _rows(table, ids):
    """table[ids], reading only those rows (a ResourceGather with an IndexedSlices gradient;
    see _util.row_source)."""
    return tf.gather(row_source(table), ids)
