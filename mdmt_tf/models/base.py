"""MDMTModel: the base of every model.

Precision: a model is built with a dtype policy (`build_model(..., dtype="mixed_bfloat16")`,
default float32), never the global one: every sub-layer is created with
`dtype=self.dtype_policy`, as keras-rs does, so two models of different precisions live
side by side (a bfloat16 training model and its float32 evaluation copy).

A model takes the feature dict the preprocessing front produces ({domain: int32 [B],
sparse: int32 [B] each, dense: float32 [B] each}) and returns {task: probability
[B, 1]}, each sample scored for its own domain. Subclasses implement `build_layers`
and `forward`, which also returns the pass's Details (logits, gates, Gate NU scalings:
mdmt_tf.models.details) for reports.

Architecture variables (M3oE's alpha, beta, gate logits) are those listed by a layer's
`architecture_weights`; `weight_variables` are all other trainable variables. The
bi-level trainer optimises the two sets with separate optimizers.

Training stages: a model trained in several stages (MTMS: its embeddings, then its network
with the embeddings frozen) names them in `stages` and says which stage an epoch belongs to
(`stage_of_epoch`) and which variables the weight optimizer updates in each
(`trainable_in_stage`), and whether the supervised loss is optimised in it
(`supervised_in_stage`: False for a self-supervised stage such as SASS's contrastive
pre-training, which optimises only the model's own losses). Its current stage is a
non-trainable int variable (`stage_variable`), so checkpoints and .keras files keep it and
a reloaded model serves in its stage; the trainer (mdmt_tf.training.trainer) moves it
forward at epoch boundaries. A model with one stage (every other model) has no such
variable.
"""
from __future__ import annotations

import dataclasses

import keras
from keras import ops

from mdmt_tf.compat import sublayers
from mdmt_tf.layers import FieldEmbedding
from mdmt_tf.layers.records import ArchValue
from mdmt_tf.models.details import Details
from mdmt_tf.models.params import Params
from mdmt_tf.models.schema import FeatureSchema


class MDMTModel(keras.Model):
    Params = Params
    stages: tuple[str, ...] = ("train",)  # the training stages' names, in order (see the module doc)

    def __init__(self, schema, params=None, **kwargs):
        super().__init__(**kwargs)
        self.schema = FeatureSchema.coerce(schema)
        self.params = self.Params.coerce(params, model=self.name)
        if len(self.stages) > 1:  # the current stage's index, saved with the weights
            self.stage_variable = keras.Variable(0, dtype="int32", trainable=False, name="stage",
                                                 aggregation="only_first_replica")
        self.build_layers()
        self(self.schema.dummy_batch(), training=False)  # create every variable now

    # ---------------------------------------------------------------- subclass API
    def build_layers(self) -> None:
        raise NotImplementedError

    def forward(self, features, training=None) -> tuple[dict, Details]:
        """-> ({task: probability [B, 1]}, the pass's Details: logits, gates, scalings)."""
        raise NotImplementedError

    def label_loss(self, features, labels, outputs, details):
        """A training loss that reads the labels ({task: [B]}), e.g. ESCM²'s counterfactual
        regulariser; None (the default) for models without one. The trainers pass the labels
        to training passes (`model(features, training=True, labels=labels)`) and the loss joins
        the model's losses (`model.losses`) like any regularisation."""
        return None

    # ------------------------------------------------------------ training stages
    def stage_of_epoch(self, epoch: int) -> int:
        """The stage (an index into `stages`) the 0-based `epoch` trains in."""
        return 0

    def trainable_in_stage(self, stage: int) -> list:
        """The variables the weight optimizer may update in `stage` (the trainer intersects them
        with its own weight variables); every trainable variable by default."""
        return list(self.trainable_variables)

    def supervised_in_stage(self, stage: int) -> bool:
        """Whether the trainer optimises the supervised loss (its per-(domain, task) BCE) in
        `stage`. False for a self-supervised stage (SASS's contrastive pre-training): the
        trainer then still reports that loss but optimises only the model's own losses
        (`model.losses`). True by default (every stage of every other model)."""
        return True

    @property
    def stage(self) -> int:
        """The current stage's index (0 for a model with one stage)."""
        if len(self.stages) == 1:
            return 0
        return int(ops.convert_to_numpy(self.stage_variable))

    def set_stage(self, stage: int) -> None:
        if not 0 <= stage < len(self.stages):
            raise ValueError(f"{self.name}: stage {stage} is not one of 0..{len(self.stages) - 1} {self.stages}")
        if len(self.stages) > 1:
            self.stage_variable.assign(stage)

    # ------------------------------------------------------------------ Keras API
    def call(self, features, training=None, labels=None):
        outputs, details = self.forward(features, training=training)
        if training and labels is not None:
            loss = self.label_loss(features, labels, outputs, details)
            if loss is not None:
                self.add_loss(loss)
        return outputs

    def get_config(self):
        return {"name": self.name, "schema": self.schema.to_dict(), "params": self.params.to_dict(),
                "dtype": keras.dtype_policies.serialize(self.dtype_policy)}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def copy_under(self, policy: str) -> "MDMTModel":
        """This model with its weights, built under the dtype `policy` ("float32" to evaluate
        exactly, "bfloat16" for a bf16 export)."""
        copy = type(self)(schema=self.schema, params=self.params, name=self.name, dtype=policy)
        copy.set_weights(self.get_weights())
        return copy

    # -------------------------------------------------------------------- helpers
    def make_embedding(self, name="embedding", with_domain=True, fields=None):
        sizes = self.schema.field_sizes(with_domain=with_domain)
        if fields is not None:
            sizes = {f: sizes[f] for f in fields}
        p = self.params
        oov_fields = [f for f in (p.oov_fields or self.schema.sparse_names) if f in sizes]
        return FieldEmbedding(sizes, p.embedding_dim, l2=p.embedding_l2, oov_rate=p.oov_rate,
                              oov_fields=oov_fields if p.oov_rate else (), tables=p.embedding_tables,
                              dtype=self.dtype_policy, name=name)

    def make_task_embeddings(self, fields) -> None:
        """Task-specific tables (STEM): one per task over `fields` (() = every sparse field);
        sets self.task_fields and self.task_embeddings."""
        from mdmt_tf.errors import ConfigError

        fields = tuple(fields) or self.schema.sparse_names
        unknown = [f for f in fields if f not in self.schema.sparse_names]
        if unknown:
            raise ConfigError(f"{self.name}: task_embedding_fields {unknown} are not sparse features; "
                              f"valid: {list(self.schema.sparse_names)}")
        self.task_fields = fields
        self.task_embeddings = [self.make_embedding(f"task_embedding_{i}", with_domain=False, fields=fields)
                                for i in range(self.schema.num_tasks)]

    def task_inputs(self, embedded, features, training=None):
        """[B, T, n_in]: for task t, its own table's embeddings of the task fields and the
        shared embeddings of the other fields (self.embedding's order), plus dense."""
        position = {f: i for i, f in enumerate(self.embedding.fields)}
        rows = []
        for table in self.task_embeddings:
            own = table(features, training=training)
            pieces = [own[:, self.task_fields.index(f)] if f in self.task_fields else embedded[:, position[f]]
                      for f in self.embedding.fields]
            rows.append(self.flat_inputs(ops.stack(pieces, axis=1), features))
        return ops.stack(rows, axis=1)

    def dense_inputs(self, features):
        """[B, n_dense] float (or None without dense features)."""
        if not self.schema.dense:
            return None
        return ops.stack([ops.cast(features[n], self.compute_dtype) for n in self.schema.dense], axis=1)

    def flat_inputs(self, embedded, features):
        """[B, F, k] embeddings (+ dense features) -> [B, F*k (+ n_dense)]."""
        flat = ops.reshape(embedded, (-1, embedded.shape[1] * embedded.shape[2]))
        dense = self.dense_inputs(features)
        return flat if dense is None else ops.concatenate([flat, ops.cast(dense, flat.dtype)], axis=1)

    def domain_index(self, features):
        return ops.cast(features[self.schema.domain], "int32")

    def probabilities(self, logits):
        """logits [B, T] -> {task: sigmoid [B, 1]} in float32."""
        probs = ops.sigmoid(ops.cast(logits, "float32"))
        return {task: probs[:, i:i + 1] for i, task in enumerate(self.schema.tasks)}

    # ------------------------------------------------------------- introspection
    @property
    def architecture_variables(self) -> list:
        found, seen = [], set()
        for layer in sublayers(self):
            for variable in getattr(layer, "architecture_weights", ()):
                if id(variable) not in seen:
                    seen.add(id(variable))
                    found.append(variable)
        return found

    @property
    def embedding_tables(self) -> list:
        """Every embedding table variable (FieldEmbedding's), shared and task-specific."""
        return [table for layer in sublayers(self) if isinstance(layer, FieldEmbedding)
                for table in layer.table_variables]

    def embedding_rows(self) -> int:
        """Rows of all embedding tables together (what a dense optimizer update touches)."""
        return sum(int(table.shape[0]) for table in self.embedding_tables)

    @property
    def weight_variables(self) -> list:
        arch = {id(v) for v in self.architecture_variables}
        return [v for v in self.trainable_variables if id(v) not in arch]

    def explain(self, features) -> Details:
        """The Details of a forward pass on a batch, as NumPy (logits, gates, Gate NU
        scalings...), with the model's architecture values (sigmoid(alpha), sigmoid(beta),
        gate logits) where it has them."""
        _, details = self.forward(features, training=False)
        return dataclasses.replace(details.numpy(), architecture=tuple(self.architecture_values()))

    def architecture_values(self) -> list[ArchValue]:
        """The architecture values of every layer that has them (alpha, beta, gate logits)."""
        values = []
        for layer in sublayers(self):
            if hasattr(layer, "architecture_values"):
                values.extend(layer.architecture_values())
        return values
