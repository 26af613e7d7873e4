"""M3oE's forward equals the authors' released model, restated in NumPy.

The restatement follows the structure of the authors' PyTorch `MDMTRec` as described in the
paper and the project's parity notes: parameters are named as there (STAR `shared_weight`,
`slot_weight[d]`, `slot_bias[d]`, `shared_bias`; `star_mlp`; `skip_conn`; `expert[e]`,
`domain_expert[d]`, `task_expert[t]`; `gate[i]` and `tower[i]` for i = t * D + d;
`bal_d`, `bal_t`, `exp_d`, `exp_t`), the forward loops over domains and (domain, task)
pairs as their code does, and `authors_parameters` is the only place that knows how our
layers store those weights. Every weight is set to random values first, so LayerNorm scales
and offsets, biases and the fusion scalars all matter.
"""
import keras
import numpy as np
import pytest

from mdmt_tf.models import FeatureSchema, build_model

EPS = 1e-5  # torch.nn.LayerNorm's default
SCHEMA = FeatureSchema(domain="domain_id", domains=("d0", "d1", "d2"), tasks=("click", "like"),
                       sparse=(("user_id", 11), ("item_id", 13), ("cate_id", 5)), dense=("age",))


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def relu(z):
    return np.maximum(z, 0.0)


def layer_norm(x, gamma, beta):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + EPS) * gamma + beta


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def linear_ln_relu(x, p):
    """The authors' MLP_N block: Linear -> LayerNorm -> ReLU."""
    return relu(layer_norm(x @ p["W"] + p["b"], p["gamma"], p["beta"]))


def authors_parameters(model):
    """Our M3oE's weights under the authors' parameter names (float64)."""
    def get(v):
        return np.asarray(keras.ops.convert_to_numpy(v), dtype=np.float64)

    D, T = model.schema.num_domains, model.schema.num_tasks
    S = model.params.num_shared_experts
    star, ex, tw = model.star, model.experts, model.towers

    def block(dense, norm):
        return {"W": get(dense.kernel), "b": get(dense.bias), "gamma": get(norm.gamma), "beta": get(norm.beta)}

    def expert(e):  # our stacked experts: shared 0..S-1, then domain, then task experts
        assert len(ex.kernels) == 1, "the authors' experts have one layer"
        return {"W": get(ex.kernels[0])[e], "b": get(ex.biases[0])[e], "gamma": get(ex.gammas[0])[e],
                "beta": get(ex.betas[0])[e]}

    gate_W = get(model.gates.logits.kernel).reshape(-1, D, T, S)  # our gates: (domain, task) major
    gate_b = get(model.gates.logits.bias).reshape(D, T, S)
    P = {
        "shared_weight": get(star.kernel), "shared_bias": get(star.bias),
        "slot_weight": [get(star.domain_kernel)[d] for d in range(D)],
        "slot_bias": [get(star.domain_bias)[d] for d in range(D)],
        "star_mlp": block(model.bottom.dense_layers[0], model.bottom.norm_layers[0]),
        "skip_conn": block(model.skip.dense_layers[0], model.skip.norm_layers[0]),
        "expert": [expert(e) for e in range(S)],
        "domain_expert": [expert(S + d) for d in range(D)],
        "task_expert": [expert(S + D + t) for t in range(T)],
        "gate": [None] * (D * T), "tower": [None] * (D * T),
        "bal_d": get(model.domain_balance.beta)[0], "bal_t": get(model.task_balance.beta)[0],
        "exp_d": get(model.amplitude.alpha_domain)[0], "exp_t": get(model.amplitude.alpha_task)[0],
    }
    for t in range(T):
        for d in range(D):
            i = t * D + d
            P["gate"][i] = {"W": gate_W[:, d, t], "b": gate_b[d, t]}
            P["tower"][i] = {"W1": get(tw.kernels[0])[d, t], "b1": get(tw.biases[0])[d, t],
                             "gamma": get(tw.gammas[0])[d, t], "beta": get(tw.betas[0])[d, t],
                             "W2": get(tw.kernels[1])[d, t], "b2": get(tw.biases[1])[d, t]}
    return P


def authors_forward(P, x, domain, D, T):
    """x: [B, n_in] concatenated input embeddings (+ dense), domain: [B] -> [B, T] probabilities."""
    skip = linear_ln_relu(x, P["skip_conn"])
    emb = np.zeros((x.shape[0], P["shared_weight"].shape[1]))
    for d in range(D):
        out = x @ (P["slot_weight"][d] * P["shared_weight"]) + P["slot_bias"][d] + P["shared_bias"]
        emb = np.where((domain == d)[:, None], out, emb)
    emb = linear_ln_relu(emb, P["star_mlp"]) + skip
    gate_value = [softmax(emb @ g["W"] + g["b"]) for g in P["gate"]]  # (the authors detach emb here)
    fea = np.stack([linear_ln_relu(emb, e) for e in P["expert"]], axis=1)  # [B, S, H]
    domain_fea = [linear_ln_relu(emb, e) for e in P["domain_expert"]]
    task_fea = [linear_ln_relu(emb, e) for e in P["task_expert"]]

    def balanced(features, raw):
        w, n = sigmoid(raw), len(features)
        return [w * features[i] + sum((1 - w) / (n - 1) * features[j] for j in range(n) if j != i)
                for i in range(n)]

    weighted_domain, weighted_task = balanced(domain_fea, P["bal_d"]), balanced(task_fea, P["bal_t"])
    results = []
    for i in range(T * D):
        fused = (np.einsum("be,beh->bh", gate_value[i], fea) + sigmoid(P["exp_d"]) * weighted_domain[i % D]
                 + sigmoid(P["exp_t"]) * weighted_task[i // D])
        tw = P["tower"][i]
        hidden = relu(layer_norm(fused @ tw["W1"] + tw["b1"], tw["gamma"], tw["beta"]))
        results.append(sigmoid(hidden @ tw["W2"] + tw["b2"])[:, 0])
    out = np.zeros((x.shape[0], T))
    for t in range(T):
        for d in range(D):
            out[:, t] = np.where(domain == d, results[t * D + d], out[:, t])
    return out


def _inputs(model, rng, n=64):
    features = {"domain_id": rng.integers(0, 3, n).astype("int32"),
                "age": rng.uniform(0, 1, n).astype("float32")}
    for name, size in SCHEMA.sparse:
        features[name] = rng.integers(0, size, n).astype("int32")
    emb = model.embedding
    table = np.asarray(keras.ops.convert_to_numpy(emb.embeddings), dtype=np.float64)
    rows = [table[emb.offsets[f] + features[f]] for f in emb.fields]  # domain indicator first, then sparse
    x = np.concatenate(rows + [features["age"][:, None].astype(np.float64)], axis=1)
    return features, x


@pytest.mark.parametrize("seed", [0, 1])
def test_forward_equals_the_authors_model(seed):
    keras.utils.set_random_seed(seed)
    model = build_model("m3oe", SCHEMA, {"embedding_dim": 16, "num_shared_experts": 4})
    rng = np.random.default_rng(seed)
    for variable in model.trainable_variables:  # every weight random, LayerNorm affines included
        scale = 1.0 if variable.path.endswith(("beta", "alpha_domain", "alpha_task")) else 0.3
        variable.assign(rng.normal(0.0, scale, variable.shape).astype("float32"))
    features, x = _inputs(model, rng)
    assert x.shape[1] == 4 * 16 + 1  # domain + 3 sparse fields at 16, one dense value

    expected = authors_forward(authors_parameters(model), x, features["domain_id"], 3, 2)
    got = model(features, training=False)
    for t, task in enumerate(SCHEMA.tasks):
        np.testing.assert_allclose(np.asarray(got[task])[:, 0], expected[:, t], rtol=2e-5, atol=2e-6)
    assert 0.05 < expected.std() and len(np.unique(features["domain_id"])) == 3  # a non-degenerate check


def test_parameter_count_matches_the_authors_model_on_movielens():
    """631,922 trainable parameters, the count measured with the authors' code on
    MovieLens-100K (~631k), at their vocabulary sizes: 943 users, 1,682 items, 2 genders, 21
    occupations, 795 zip codes, 19 genres, 3 age domains. (A run of ours adds one OOV row per
    field, which their label encoding has not: 7 x 16 = 112 more. Two-layer experts, 256 ->
    256 -> 64, would give 1.23M.)"""
    schema = FeatureSchema(domain="domain_id", domains=("<25", "25-34", ">=35"), tasks=("click", "like"),
                           sparse=(("user_id", 943), ("item_id", 1682), ("gender", 2), ("occupation", 21),
                                   ("zip", 795), ("cate_id", 19)), dense=("age",))
    model = build_model("m3oe", schema)
    count = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    # embeddings 3,465 x 16; STAR 4 x (113 x 512 + 512); star_mlp 131,328 + 512; skip 28,928 + 512;
    # 9 experts x (256 x 64 + 64 + 128); 6 gates x (256 x 4 + 4); 6 towers x (64 x 64 + 64 + 128 + 65);
    # 4 fusion scalars
    expected = (3465 * 16 + 4 * (113 * 512 + 512) + (512 * 256 + 256 + 512) + (113 * 256 + 256 + 512)
                + 9 * (256 * 64 + 64 + 128) + 6 * (256 * 4 + 4) + 6 * (64 * 64 + 64 + 128 + 65) + 4)
    assert count == expected == 631_922
