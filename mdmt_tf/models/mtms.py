"""MTMS: the multi-task multi-scene unified ranking model (Tan et al., IEEE BigData 2021,
Baidu; seed 002's "MTMS"), trained in its two stages.

Every (task t, scenario s) pair has its own embedding table E_{t,s} over the sparse fields
(no table is shared: a task or a scenario can be added without touching the others).
Write e_{t,s}(x) [F, k] for sample x's ids embedded by E_{t,s}, s(x) for x's scenario and
dense(x) for its dense features.

Stage 1, "embedding" (the first `stage_epochs` epochs): no shared modeling. Task t's logit
of a sample comes only from its own pair's table through a small per-pair network:

    pair_t(x) = f_{t,s(x)}( [flat e_{t,s(x)}(x), dense(x)] )

with f_{t,s} an MLP (`pair_units`) then a linear logit, one per pair. The tables and the
pair networks are trained; the loss is the sum over tasks (the trainer's).

Stage 2, "network" (every later epoch): the tables are frozen (the weight optimizer skips
them: they and their optimizer slots do not move) and the network is fine-tuned with more
fields: a per-task DNN g_t, shared by the scenarios, reads the sample's embeddings from
several pairs' tables ("aggregation of different components -> shared modeling"):

    network_t(x) = g_t( [flat e_{t',s'}(x) for (t', s') in inputs(t, x), dense(x)] )
    logit_t(x)   = pair_t(x) + network_t(x)

inputs (`network_inputs`): "scenario" (default) the T tables of x's scenario, every task's
(t' = 1..T, s' = s(x)), so e.g. the like DNN also reads the click embeddings of the same
scene; "task" the D tables of task t, every scenario's; "all" all T*D tables. g_t is an MLP
(`network_units`) then a linear logit whose kernel and bias start at zero, so stage 2
starts from stage 1's predictions; the pair networks f keep training in stage 2 ("network
fine tune"), g_t starts training there. In stage 1 network_t is not applied (0) and the
weight optimizer skips g (it does not move).

The stage is the model's `stage_variable` (0 or 1, saved in checkpoints and .keras files:
a reloaded model serves in its stage); mdmt_tf.training.trainer.MDMTTrainer moves it to
"network" at epoch `stage_epochs` and from then on updates only stage 2's variables.

Defaults, from the seed: independent tables per (task, scenario); stage 1 trains the
embeddings without shared modeling; stage 2 fixes the embeddings and fine-tunes a DNN with
more input fields; the loss is the sum over tasks. My choices (the seed and my memory of
the paper give no values): stage_epochs 5; pair_units (64,); network_units (128, 64);
network_inputs "scenario"; the residual form pair + network with network_t zero at the
switch (the paper widens the network's input; this keeps stage 1's function at the switch,
so the validation score does not restart from a random DNN). The shared `dropout` is not
used (the networks have none, as MMoE's experts here).

Implementation notes: every table is looked up for the whole batch and each sample's own
pair selected by a one-hot product over scenarios (as Towers' per-domain towers), so a
table's gradient has zero rows for other scenarios' samples. `embedding_l2` is applied by
the model to the rows each sample uses (its scenario's T tables), not by every lookup.
"""
from __future__ import annotations

import dataclasses

from keras import ops

from mdmt_tf.errors import ConfigError
from mdmt_tf.layers import ExpertGroup, Towers
from mdmt_tf.layers._util import register, select_by_domain
from mdmt_tf.models.base import MDMTModel
from mdmt_tf.models.details import Details
from mdmt_tf.models.params import Params


@dataclasses.dataclass(frozen=True)
class MTMSParams(Params):
    """pair_units: hidden widths of each (task, scenario) pair's network in stage 1 (a linear
      logit follows).
    network_units: hidden widths of each task's stage-2 DNN (a linear logit, zero at the
      switch, follows).
    network_inputs: the tables the stage-2 DNN of task t reads for a sample of scenario s:
      "scenario" (every task's table of s), "task" (every scenario's table of t) or "all".
    stage_epochs: epochs of stage 1 ("embedding"); stage 2 ("network") trains every later epoch."""

    pair_units: tuple[int, ...] = (64,)
    network_units: tuple[int, ...] = (128, 64)
    network_inputs: str = "scenario"
    stage_epochs: int = 5
    CHOICES = {"network_inputs": ("scenario", "task", "all")}

    def validate(self, model):
        super().validate(model)
        if self.stage_epochs < 1:
            raise ConfigError(f"{model}: stage_epochs (the embedding stage's epochs) must be >= 1, "
                              f"got {self.stage_epochs}")


@register
class MTMS(MDMTModel):
    """Multi-task multi-scene unified ranking with per-(task, scenario) embeddings, trained
    in two stages (see the module doc)."""

    Params = MTMSParams
    params: MTMSParams
    stages = ("embedding", "network")

    def build_layers(self):
        p, d, t = self.params, self.schema.num_domains, self.schema.num_tasks
        # table (t, s) at index s * T + t: every scenario's T tables side by side
        self.pair_tables = []
        for s in range(d):
            for task in range(t):
                table = self.make_embedding(f"pair_embedding_{task}_{s}", with_domain=False)
                table.l2 = 0.0  # the model applies embedding_l2 to the rows each sample uses (forward)
                self.pair_tables.append(table)
        self.pair_towers = Towers(t, p.pair_units, num_domains=d, dtype=self.dtype_policy, name="pair_towers")
        self.network = ExpertGroup(t, p.network_units, dtype=self.dtype_policy, name="network")
        self.network_head = Towers(t, (), kernel_initializer="zeros", dtype=self.dtype_policy, name="network_head")

    # ------------------------------------------------------------ stages
    def stage_of_epoch(self, epoch: int) -> int:
        return 0 if epoch < self.params.stage_epochs else 1

    def trainable_in_stage(self, stage: int) -> list:
        """Stage 0: the tables and the pair networks; stage 1: every variable but the tables."""
        skip = ({id(v) for v in self.network.trainable_variables + self.network_head.trainable_variables}
                if stage == 0 else {id(v) for v in self.embedding_tables})
        return [v for v in self.trainable_variables if id(v) not in skip]

    # ------------------------------------------------------------ forward
    def _with_dense(self, flat, features):
        """[B, n] or [B, G, n] -> the same with the dense features appended."""
        dense = self.dense_inputs(features)
        if dense is None:
            return flat
        dense = ops.cast(dense, flat.dtype)
        if len(flat.shape) == 3:
            dense = ops.broadcast_to(dense[:, None, :], (ops.shape(flat)[0], flat.shape[1], dense.shape[-1]))
        return ops.concatenate([flat, dense], axis=-1)

    def forward(self, features, training=None):
        p, d, t = self.params, self.schema.num_domains, self.schema.num_tasks
        domain = self.domain_index(features)
        embedded = [table(features, training=training) for table in self.pair_tables]  # each [B, F, k]
        fields, k = embedded[0].shape[1], embedded[0].shape[2]
        every = ops.reshape(ops.stack(embedded, axis=1), (-1, d, t, fields, k))  # [B, D, T, F, k]
        own = select_by_domain(every, domain, d)  # [B, T, F, k]: the sample's scenario's tables
        if p.embedding_l2:  # on the rows the sample uses, in float32 (as FieldEmbedding's)
            rows = ops.cast(own, "float32")
            batch = ops.cast(ops.shape(rows)[0], "float32")
            self.add_loss(p.embedding_l2 * ops.sum(ops.square(rows)) / ops.maximum(batch, 1.0))

        # stage 1: task t's logit from its own pair's table only
        pair_x = self._with_dense(ops.reshape(own, (-1, t, fields * k)), features)  # [B, T, F*k (+dense)]
        pair_logits = self.pair_towers(pair_x, domain=domain)  # [B, T]

        # stage 2: the per-task DNN over more tables
        if p.network_inputs == "scenario":
            net_x = self._with_dense(ops.reshape(own, (-1, t * fields * k)), features)  # shared by the tasks
        elif p.network_inputs == "task":
            per_task = ops.transpose(every, (0, 2, 1, 3, 4))  # [B, T, D, F, k]
            net_x = self._with_dense(ops.reshape(per_task, (-1, t, d * fields * k)), features)
        else:
            net_x = self._with_dense(ops.reshape(every, (-1, d * t * fields * k)), features)
        network = self.network_head(self.network(net_x))  # [B, T]
        in_network_stage = ops.greater_equal(self.stage_variable, 1)
        network_logits = ops.where(in_network_stage, network, ops.zeros_like(network))  # not applied in stage 1
        logits = pair_logits + network_logits
        return self.probabilities(logits), Details(logits, extra={"pair_logits": pair_logits,
                                                                  "network_logits": network_logits})
