"""ADI: Adaptive Domain Interest network (Jiang et al., CIKM 2022; seed 002, "ADI").

The paper's network, with one tower per task at the end (the paper scores one retrieval
task; mdmt_tf's tasks each get a tower on the shared representation). f = the domain
indicator's embedding, d = the row's domain, F_1..F_N its sparse fields' embeddings.

1. Domain interest adaptation layer (seed 002's equation; the paper's domain-specific
   SE-block approach, `interest_adaptation="se"`):

       alpha^(d) = F_se^(d)(concat(avg(F_1), ..., avg(F_N))),   F^_i = alpha^(d)_i * F_i

   avg is the mean over the embedding's k values, F_se^(d) = FC -> ReLU -> FC with
   weights of domain d (hidden width ceil(N / se_reduction)); the last FC's bias starts
   at 1, so alpha starts near 1 (the layer starts close to the identity). The other
   choices: "domain", a learned scale per (domain, field) (alpha^(d) independent of the
   row), and "none" (no adaptation, the ablation). The paper's other approaches are not
   implemented.
2. Shared networks: K MLPs on the adapted inputs, weighted by a softmax gate of f:
   alpha_k = softmax_k(W_k f + b_k), E_shared = sum_k alpha_k MLP_k(x). (Seed 002 prints
   the gate as a plain ratio of the linear terms; read as a softmax, the exp lost in the
   extraction.)
3. Domain-specific networks: one MLP per domain, E_spec = MLP^(d)(x), each row through its
   own domain's (all domains computed as one einsum, the row's selected by a one-hot
   product: the other domains' networks get exactly zero gradient from it).
4. Fusion layer (seed 002): beta_1 = sigmoid(W^(d)_spec f), beta_2 = sigmoid(W^(d)_shared f),
   per unit of E (vectors of width H, our choice: the seed does not say scalar or vector),
   E_fusion = concat(beta_1 E_spec | beta_1 E_spec * beta_2 E_shared | beta_2 E_shared).
5. Domain-specific forward network: E = FC^(d)_forward(E_fusion), per-domain MLP again.
6. A tower per task on E (Towers), one logit each.

Domain-specific batch normalisation (DSBN): every hidden layer of the shared networks, the
domain-specific networks and the forward network is Dense -> DSBN -> ReLU, DSBN being
STAR's PartitionedNorm (statistics and affine parameters per domain: the batch moments of
the row's own domain in training, that domain's moving moments at inference; an absent
domain leaves its moving moments alone). Where the paper puts DSBN is our reading (it
replaces batch normalisation in the backbone, as DSBN does in its original paper);
`dsbn=false` drops it (the "w/o DSBN" ablation). In a domain-specific network DSBN is the
network's own batch normalisation, since only its domain's rows reach it.

Defaults: K = 4 shared networks, widths (256, 128), forward (64,), towers (32,), SE
reduction 2, momentum 0.9 (STAR's here): our choices, the paper's values are not in the
seed. Verified in the seed text: the gate from f over K shared MLPs, the per-domain
specific MLPs, the fusion equations, the domain-specific forward network, DSBN, the SE
adaptation's equation with F_se = (FC, ReLU, FC) and average pooling per field.

Details: logits [B, T]; gate "shared" [B, 1, K] (alpha_k, one gate for every task); extra
"interest" [B, N] (alpha^(d) per field, unless interest_adaptation="none"),
"fusion_specific" and "fusion_shared" [B, H] (beta_1, beta_2).
"""
from __future__ import annotations

import dataclasses
import math

import keras
from keras import layers, ops

from mdmt_tf.errors import ConfigError
from mdmt_tf.layers import PartitionedNorm, Towers
from mdmt_tf.layers._util import check_positive_int, check_units, clone_initializer, register, select_by_domain
from mdmt_tf.layers.initializers import GroupedGlorotUniform
from mdmt_tf.models.base import MDMTModel
from mdmt_tf.models.details import Details, Gate
from mdmt_tf.models.params import Params

ADAPTATIONS = ("se", "domain", "none")


@dataclasses.dataclass(frozen=True)
class ADIParams(Params):
    """num_shared_networks: K, the shared MLPs weighted by the domain gate.
    network_units: the layers of every shared and every domain-specific network (the same,
      so E_spec * E_shared is defined).
    forward_units: the domain-specific forward network's layers on E_fusion (() = none).
    tower_units: each task tower's hidden layers (() = a linear head).
    interest_adaptation: "se" (the paper's domain-specific SE block), "domain" (a learned
      scale per domain and field) or "none".
    se_reduction: the SE block's hidden width is ceil(fields / se_reduction).
    dsbn: Dense -> domain-specific batch norm -> ReLU in every network; false: Dense -> ReLU.
    norm_momentum: the DSBN moving moments' momentum (inference uses them)."""

    num_shared_networks: int = 4
    network_units: tuple[int, ...] = (256, 128)
    forward_units: tuple[int, ...] = (64,)
    tower_units: tuple[int, ...] = (32,)
    interest_adaptation: str = "se"
    se_reduction: int = 2
    dsbn: bool = True
    norm_momentum: float = 0.9
    CHOICES = {"interest_adaptation": ADAPTATIONS}
    MAY_BE_EMPTY = Params.MAY_BE_EMPTY | {"forward_units", "tower_units"}

    def validate(self, model):
        super().validate(model)
        if self.se_reduction < 1:
            raise ConfigError(f"{model}: se_reduction must be >= 1, got {self.se_reduction}")
        if not 0 <= self.norm_momentum < 1:
            raise ConfigError(f"{model}: norm_momentum must be in [0, 1), got {self.norm_momentum}")


# ----------------------------------------------------------------------- layers
@register
class DomainInterestAdaptation(keras.layers.Layer):
    """Scales each field's embedding by alpha^(d) [B, N] of the row's domain d.

    mode "se": alpha = FC2^(d)(relu(FC1^(d)(mean_k F))) (ADI's domain-specific SE block,
    the bias of FC2 starting at 1); "domain": alpha = a learned vector per domain (ones at
    first). call(embedded [B, N, k], domain [B]) -> (adapted [B, N, k], alpha [B, N]).
    """

    MODES = ("se", "domain")

    def __init__(self, num_domains, mode="se", reduction=2, **kwargs):
        super().__init__(**kwargs)
        self.num_domains = check_positive_int(num_domains, "num_domains", "DomainInterestAdaptation")
        if mode not in self.MODES:
            raise ValueError(f"DomainInterestAdaptation: `mode` must be one of {self.MODES}, received mode={mode!r}")
        self.mode = mode
        self.reduction = check_positive_int(reduction, "reduction", "DomainInterestAdaptation")

    def build(self, input_shape):
        n, d = input_shape[1], self.num_domains
        if self.mode == "domain":
            self.domain_scale = self.add_weight(name="domain_scale", shape=(d, n), initializer="ones")
            return
        hidden = max(1, math.ceil(n / self.reduction))
        self.kernel_1 = self.add_weight(name="kernel_1", shape=(d, n, hidden), initializer=GroupedGlorotUniform())
        self.bias_1 = self.add_weight(name="bias_1", shape=(d, hidden), initializer="zeros")
        self.kernel_2 = self.add_weight(name="kernel_2", shape=(d, hidden, n), initializer=GroupedGlorotUniform())
        self.bias_2 = self.add_weight(name="bias_2", shape=(d, n), initializer="ones")

    def call(self, embedded, domain):
        if self.mode == "domain":
            alpha = ops.matmul(ops.one_hot(domain, self.num_domains, dtype=embedded.dtype), self.domain_scale)
        else:
            pooled = ops.mean(embedded, axis=-1)  # [B, N]: F_avg of each field
            hidden = ops.relu(ops.einsum("bn,dnr->bdr", pooled, self.kernel_1) + self.bias_1)
            alpha = select_by_domain(ops.einsum("bdr,drn->bdn", hidden, self.kernel_2) + self.bias_2,
                                     domain, self.num_domains)
        return embedded * alpha[:, :, None], alpha

    def get_config(self):
        return {**super().get_config(), "num_domains": self.num_domains, "mode": self.mode,
                "reduction": self.reduction}


class _Networks(keras.layers.Layer):
    """Stacked MLPs (one kernel [G, in, out] per layer), each hidden layer Dense -> DSBN
    (optional) -> ReLU -> dropout. Subclasses say how rows meet the G networks."""

    def __init__(self, num_groups, units, num_domains, dsbn=True, momentum=0.9, dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        name = type(self).__name__
        self.num_groups = check_positive_int(num_groups, "num_groups", name)
        self.units = check_units(units, "units", name)
        self.num_domains = check_positive_int(num_domains, "num_domains", name)
        self.dsbn, self.momentum, self.dropout = bool(dsbn), float(momentum), float(dropout)
        # one attribute per norm, not a list: TF's checkpoints do not track Keras lists of layers, and
        # the norms' moving statistics (non-trainable) are not reachable through the optimizer either
        self.num_norms = len(self.units) if self.dsbn else 0
        for i in range(self.num_norms):
            setattr(self, f"dsbn_{i}", PartitionedNorm(self.num_domains, momentum=self.momentum,
                                                       dtype=self.dtype_policy, name=f"dsbn_{i}"))
        self.dropout_layer = layers.Dropout(self.dropout, dtype=self.dtype_policy) if self.dropout else None

    @property
    def norms(self) -> list:
        return [getattr(self, f"dsbn_{i}") for i in range(self.num_norms)]

    def _norm_width(self, width: int) -> int:
        raise NotImplementedError

    def build(self, input_shape):
        fan_in, g = input_shape[-1], self.num_groups
        initializer = GroupedGlorotUniform()
        self.kernels, self.biases = [], []
        for i, width in enumerate(self.units):
            self.kernels.append(self.add_weight(name=f"kernel_{i}", shape=(g, fan_in, width),
                                                initializer=clone_initializer(initializer, i)))
            self.biases.append(self.add_weight(name=f"bias_{i}", shape=(g, width), initializer="zeros"))
            if self.dsbn:
                self.norms[i].build((None, self._norm_width(width)))
            fan_in = width

    def _finish(self, h, i, domain, training):
        """Layer i's pre-activation [B, width'] -> DSBN -> ReLU -> dropout."""
        if self.dsbn:
            h = self.norms[i](h, domain, training=training)
        h = ops.relu(h)
        if self.dropout_layer is not None:
            h = self.dropout_layer(h, training=training)
        return h

    def get_config(self):
        return {**super().get_config(), "num_groups": self.num_groups, "units": list(self.units),
                "num_domains": self.num_domains, "dsbn": self.dsbn, "momentum": self.momentum,
                "dropout": self.dropout}


@register
class SharedNetworks(_Networks):
    """K shared MLPs on the same input: call(x [B, in], domain [B]) -> [B, K, H]. The DSBN
    of a layer normalises the K networks' units together ([B, K * width]), per domain."""

    def _norm_width(self, width):
        return self.num_groups * width

    def call(self, x, domain, training=None):
        h = x
        for i, (kernel, bias) in enumerate(zip(self.kernels, self.biases)):
            width = kernel.shape[2]
            if i == 0:  # [B, in] x [in, K * width]: one GEMM for every network
                wide = ops.reshape(ops.transpose(kernel, (1, 0, 2)), (kernel.shape[1], self.num_groups * width))
                h = ops.matmul(h, wide) + ops.reshape(bias, (-1,))
            else:
                h = ops.reshape(ops.einsum("bki,kio->bko", h, kernel) + bias, (-1, self.num_groups * width))
            h = ops.reshape(self._finish(h, i, domain, training), (-1, self.num_groups, width))
        return h


@register
class DomainSpecificNetworks(_Networks):
    """One MLP per domain (num_groups = num_domains): call(x [B, in], domain [B]) -> [B, H],
    each row through its own domain's MLP (every domain's layer is one einsum, the row's
    own selected by a one-hot product, so the others get zero gradient from it)."""

    def __init__(self, num_domains, units, **kwargs):
        kwargs.pop("num_groups", None)
        super().__init__(num_domains, units, num_domains, **kwargs)

    def _norm_width(self, width):
        return width

    def call(self, x, domain, training=None):
        h = x
        for i, (kernel, bias) in enumerate(zip(self.kernels, self.biases)):
            h = select_by_domain(ops.einsum("bi,dio->bdo", h, kernel) + bias, domain, self.num_domains)
            h = self._finish(h, i, domain, training)
        return h


@register
class DomainFusion(keras.layers.Layer):
    """ADI's fusion layer: beta_1 = sigmoid(W^(d)_spec f + b), beta_2 = sigmoid(W^(d)_shared f + b),
    [B, units] each; call(f [B, k], specific [B, units], shared [B, units], domain [B]) ->
    (concat(beta_1 spec | beta_1 spec * beta_2 shared | beta_2 shared) [B, 3 units], beta_1, beta_2)."""

    def __init__(self, num_domains, units, **kwargs):
        super().__init__(**kwargs)
        self.num_domains = check_positive_int(num_domains, "num_domains", "DomainFusion")
        self.units = check_positive_int(units, "units", "DomainFusion")

    def build(self, input_shape):
        shape = (self.num_domains, input_shape[-1], self.units)
        self.spec_kernel = self.add_weight(name="spec_kernel", shape=shape, initializer=GroupedGlorotUniform())
        self.spec_bias = self.add_weight(name="spec_bias", shape=(self.num_domains, self.units), initializer="zeros")
        self.shared_kernel = self.add_weight(name="shared_kernel", shape=shape, initializer=GroupedGlorotUniform())
        self.shared_bias = self.add_weight(name="shared_bias", shape=(self.num_domains, self.units),
                                           initializer="zeros")

    def _weight(self, f, kernel, bias, domain):
        return ops.sigmoid(select_by_domain(ops.einsum("bk,dkh->bdh", f, kernel) + bias, domain, self.num_domains))

    def call(self, f, specific, shared, domain):
        beta_1 = self._weight(f, self.spec_kernel, self.spec_bias, domain)
        beta_2 = self._weight(f, self.shared_kernel, self.shared_bias, domain)
        spec, common = beta_1 * specific, beta_2 * shared
        return ops.concatenate([spec, spec * common, common], axis=-1), beta_1, beta_2

    def get_config(self):
        return {**super().get_config(), "num_domains": self.num_domains, "units": self.units}


# ------------------------------------------------------------------------ model
@register
class ADI(MDMTModel):
    """Adaptive domain interest network (see the module doc)."""

    Params = ADIParams
    params: ADIParams

    def build_layers(self):
        p, s = self.params, self.schema
        if not s.sparse_names:
            raise ConfigError(f"{self.name}: ADI adapts the sparse fields' embeddings; the schema has none "
                              f"(dense only: {list(s.dense)})")
        policy, d = self.dtype_policy, s.num_domains
        self.embedding = self.make_embedding(with_domain=False)
        self.domain_embedding = layers.Embedding(d, p.embedding_dim, dtype=policy, name="domain_embedding")
        self.adaptation = None
        if p.interest_adaptation != "none":
            self.adaptation = DomainInterestAdaptation(d, p.interest_adaptation, p.se_reduction, dtype=policy,
                                                       name="interest_adaptation")
        norm = {"dsbn": p.dsbn, "momentum": p.norm_momentum, "dropout": p.dropout, "dtype": policy}
        self.shared = SharedNetworks(p.num_shared_networks, p.network_units, d, name="shared_networks", **norm)
        self.gate = layers.Dense(p.num_shared_networks, dtype=policy, name="shared_gate")
        self.specific = DomainSpecificNetworks(d, p.network_units, name="specific_networks", **norm)
        self.fusion = DomainFusion(d, p.network_units[-1], dtype=policy, name="fusion")
        self.forward_network = (DomainSpecificNetworks(d, p.forward_units, name="forward_network", **norm)
                                if p.forward_units else None)
        self.towers = Towers(s.num_tasks, p.tower_units, dtype=policy, name="towers")

    def forward(self, features, training=None):
        domain = self.domain_index(features)
        f = self.domain_embedding(domain)  # [B, k]
        embedded = self.embedding(features, training=training)
        extra = {}
        if self.adaptation is not None:
            embedded, interest = self.adaptation(embedded, domain)
            extra["interest"] = ops.cast(interest, "float32")
        x = self.flat_inputs(embedded, features)
        gate = ops.softmax(ops.cast(self.gate(f), "float32"), axis=-1)  # [B, K]
        shared = ops.einsum("bk,bkh->bh", ops.cast(gate, x.dtype), self.shared(x, domain, training=training))
        specific = self.specific(x, domain, training=training)
        h, beta_1, beta_2 = self.fusion(f, specific, shared, domain)
        if self.forward_network is not None:
            h = self.forward_network(h, domain, training=training)
        logits = self.towers(h)
        extra["fusion_specific"] = ops.cast(beta_1, "float32")
        extra["fusion_shared"] = ops.cast(beta_2, "float32")
        return self.probabilities(logits), Details(logits, gates=(Gate("shared", gate[:, None, :]),), extra=extra)
