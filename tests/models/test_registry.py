import numpy as np
import pytest

from mdmt_tf.errors import ConfigError
from mdmt_tf.models import FeatureSchema, ModelConfig, build_model, model_names
from mdmt_tf.models.m3oe import M3oE


def test_unknown_model_lists_the_valid_ones(encoded):
    schema, _ = encoded
    with pytest.raises(ConfigError) as err:
        build_model("m4oe", schema)
    assert "unknown model 'm4oe'" in str(err.value)
    for name in model_names():
        assert name in str(err.value)


@pytest.mark.parametrize("params, fragment", [
    ({"num_shared_expert": 4}, "unknown hyper-parameter(s) ['num_shared_expert']; valid: ["),
    ({"num_shared_experts": 0}, "num_shared_experts must be >= 1"),
    ({"num_shared_experts": 2.5}, "must be an integer"),
    ({"expert_units": [256, -1]}, "list of positive integers"),
    ({"expert_units": []}, "expert_units must not be empty"),
    ({"gating": "moe"}, "choose one of ['softmax', 'aftb']"),
    ({"arch_granularity": "matrix"}, "choose one of ['scalar', 'vector']"),
    ({"aftb_domains": True}, "needs gating='aftb'"),
    ({"dropout": 1.5}, "dropout must be in [0, 1)"),
    ({"gate_stop_gradient": "yes"}, "true or false"),
    ({"embedding_l2": "small"}, "embedding_l2='small' must be a number"),
])
def test_invalid_hyper_parameters_are_named(params, fragment):
    with pytest.raises(ConfigError) as err:
        ModelConfig("m3oe", params)
    assert fragment in str(err.value) and "m3oe" in str(err.value)


def test_presets_and_other_models_validate():
    with pytest.raises(ConfigError, match="contradict the model's preset"):
        ModelConfig("m3oe_aftb", {"gating": "softmax"})
    with pytest.raises(ConfigError, match="num_levels >= 2"):
        ModelConfig("ple", {"num_levels": 1})
    assert ModelConfig("m3oe_aftb").resolved_params()["gating"] == "aftb"
    with pytest.raises(ConfigError, match="task_embedding_fields"):
        build_model("stem", FeatureSchema(domain="d", domains=["a"], tasks=["y"], sparse=[["u", 3]]),
                    {"task_embedding_fields": ["nope"]})


def test_exponent_numbers_without_a_dot_are_numbers(tmp_path):
    """YAML 1.1 (PyYAML, hence --param and --hparams files) reads 1e-5 as a string."""
    import yaml

    assert yaml.safe_load("1e-5") == "1e-5"
    assert ModelConfig("m3oe", {"embedding_l2": "1e-5"}).resolved_params()["embedding_l2"] == 1e-5
    (tmp_path / "m.yaml").write_text("name: mmoe\nparams:\n  embedding_l2: 2e-6\n")
    assert ModelConfig.from_file(tmp_path / "m.yaml").resolved_params()["embedding_l2"] == 2e-6


def test_model_config_files(tmp_path):
    (tmp_path / "m.yaml").write_text("name: mmoe\nparams:\n  num_experts: 6\n  expert_units: [32, 16]\n")
    config = ModelConfig.from_file(tmp_path / "m.yaml")
    assert config.resolved_params()["num_experts"] == 6
    assert config.resolved_params()["expert_units"] == [32, 16]
    (tmp_path / "bad.yaml").write_text("model: mmoe\n")
    with pytest.raises(ConfigError, match="'name'"):
        ModelConfig.from_file(tmp_path / "bad.yaml")


def test_m3oe_defaults_are_the_authors_configuration(encoded):
    schema, _ = encoded
    model = build_model("m3oe", schema)
    assert isinstance(model, M3oE)
    shapes = {v.path.split("/", 1)[1]: tuple(v.shape) for v in model.trainable_variables}
    n_in = (1 + len(schema.sparse)) * 16 + len(schema.dense)  # domain + sparse fields, 16-d, + dense
    d, t = schema.num_domains, schema.num_tasks
    assert shapes["embedding/embeddings"][1] == 16
    # bottom: STAR n_in -> 512 (shared and per-domain kernels and biases), Dense 512 -> 256 + LayerNorm;
    # skip: Dense n_in -> 256 + LayerNorm
    assert shapes["star_bottom/kernel"] == (n_in, 512) and shapes["star_bottom/domain_kernel"] == (d, n_in, 512)
    assert shapes["star_bottom/bias"] == (512,) and shapes["star_bottom/domain_bias"] == (d, 512)
    assert shapes["bottom/dense_0/kernel"] == (512, 256) and shapes["bottom/norm_0/gamma"] == (256,)
    assert shapes["skip/dense_0/kernel"] == (n_in, 256) and shapes["skip/norm_0/gamma"] == (256,)
    # 4 shared + one per domain + one per task, each 256 -> 64 with its own LayerNorm, stacked in one group
    assert shapes["experts/kernel_0"] == (4 + d + t, 256, 64) and "experts/kernel_1" not in shapes
    assert shapes["experts/norm_gamma_0"] == (4 + d + t, 64)
    assert [model.expert_slices[k] for k in ("shared", "domain", "task")] == [
        slice(0, 4), slice(4, 4 + d), slice(4 + d, 4 + d + t)]
    # towers per (domain, task): 64 -> 64 + LayerNorm -> 1
    assert shapes["towers/kernel_0"] == (d, t, 64, 64) and shapes["towers/kernel_1"] == (d, t, 64, 1)
    assert shapes["towers/norm_gamma_0"] == (d, t, 64) and "towers/norm_gamma_1" not in shapes
    assert shapes["shared_gates/logits/kernel"] == (256, d * t * 4)


@pytest.mark.parametrize("granularity", ["scalar", "vector"])
def test_m3oe_architecture_variables_and_explain(granularity, encoded):
    from tests.models.conftest import take

    schema, splits = encoded
    model = build_model("m3oe", schema, {"arch_granularity": granularity})
    arch = {v.path.split("/", 1)[1]: v for v in model.architecture_variables}
    assert sorted(arch) == ["amplitude/alpha_domain", "amplitude/alpha_task", "domain_balance/beta",
                            "task_balance/beta"]
    size = {"scalar": (1, 1), "vector": (schema.num_domains, schema.num_tasks)}[granularity]
    assert arch["amplitude/alpha_domain"].shape == (size[0],) and arch["task_balance/beta"].shape == (size[1],)
    arch_ids = {id(v) for v in model.architecture_variables}
    assert not any(id(v) in arch_ids for v in model.weight_variables)
    assert len(model.weight_variables) + len(arch) == len(model.trainable_variables)

    features, _ = take(*splits["test"], range(20))
    details = model.explain(features)
    gates = details.gate("shared").weights
    assert gates.shape == (20, schema.num_tasks, 4)
    assert abs(gates.sum(-1) - 1).max() < 1e-5
    values = {v.key: v.value for v in details.architecture}
    assert sorted(values) == ["alpha/domain", "alpha/task", "beta/domain", "beta/task"]
    assert abs(values["alpha/task"] - 0.7310586).max() < 1e-6 and values["alpha/task"].shape == (size[1],)


def test_gate_logits_are_architecture_variables(encoded):
    schema, _ = encoded
    model = build_model("m3oe", schema, {"shared_gate": "logits"})
    assert len(model.architecture_variables) == 5
    logits = [v for v in model.architecture_values() if v.kind == "gate_logits"]
    assert len(logits) == 1 and logits[0].group == "shared_gate_logits"
    assert logits[0].value.shape == (schema.num_domains * schema.num_tasks, 4) and (logits[0].value == 0).all()


def _expected_explain_shapes(name, model, schema, n):
    """{(field, name): shape} of the Details `explain` must return for a batch of n rows."""
    d, t, p = schema.num_domains, schema.num_tasks, model.params
    n_in = len(schema.sparse) * p.embedding_dim + len(schema.dense)  # STAR, PEPNet: domain not a field
    shapes = {("logits", ""): (n, t)}
    if name == "m3oe":
        shapes[("gates", "shared")] = (n, t, p.num_shared_experts)
    elif name == "m3oe_aftb":
        shapes[("gates", "all_experts")] = (n, t, p.num_shared_experts + d + t)
    elif name == "stem":
        shapes[("gates", "tasks")] = (n, t, p.num_shared_experts + t * p.num_task_experts)
    elif name in ("mmoe", "omoe", "me_mmoe"):  # omoe: its one gate, repeated for every task
        shapes[("gates", "tasks")] = (n, t, p.num_experts)
    elif name in ("ple", "me_ple"):
        shapes[("gates", "tasks")] = (n, t, p.num_task_experts + p.num_shared_experts)
    elif name == "pepnet":
        shapes[("scalings", "epnet")] = (n, n_in)
        for i, width in enumerate((n_in,) + p.tower_units):
            shapes[("scalings", f"ppnet_{i}")] = (n, t, width)
    elif name == "adi":
        shapes[("gates", "shared")] = (n, 1, p.num_shared_networks)
        shapes[("extra", "fusion_specific")] = (n, p.network_units[-1])
        shapes[("extra", "fusion_shared")] = (n, p.network_units[-1])
        if p.interest_adaptation != "none":
            shapes[("extra", "interest")] = (n, len(schema.sparse))
    elif name == "aesm2":  # the mix weights applied and the selection masks, per layer
        for prefix, count, slots, experts in (("scenario", p.num_scenario_layers, 1, p.num_scenario_experts),
                                              ("task", p.num_task_layers, t, p.num_task_experts)):
            for i in range(count):
                for field, key in (("gates", f"{prefix}_layer_{i}"), ("extra", f"{prefix}_layer_{i}_specific"),
                                   ("extra", f"{prefix}_layer_{i}_shared")):
                    shapes[(field, key)] = (n, slots, experts)
    elif name == "m2m":
        shapes[("gates", "meta_attention")] = (n, t, p.num_experts)
    elif name == "musenet":
        shapes[("gates", "scenarios")] = (n, 1, p.num_scenarios)
        shapes[("extra", "scenario_posterior")] = (n, p.num_scenarios)
    elif name == "mtms":  # stage 1's per-pair logits; stage 2's DNN logits as applied (0 in stage 1)
        shapes[("extra", "pair_logits")] = (n, t)
        shapes[("extra", "network_logits")] = (n, t)
    elif name == "sass":  # the own scenario's fusion weight alpha; mean adaptive / update gate per SAGU layer
        shapes[("extra", "fusion_alpha")] = (n, p.sat_units)
        shapes[("extra", "adaptive_gate")] = (n, p.num_sat_layers)
        shapes[("extra", "update_gate")] = (n, p.num_sat_layers)
    elif name in ("esmm", "escm2"):
        shapes[("extra", "conditional")] = (n, t)
        if name == "escm2":  # the DR imputation tower's conditional labels
            shapes[("extra", "imputed")] = (n, t - 1)
    elif name == "aitm":
        shapes[("extra", "transfer_weight")] = (n, t - 1)
    else:
        assert name in ("mlp", "shared_bottom", "star"), f"{name}: add its explain keys here"
    return shapes


@pytest.mark.parametrize("name", model_names())
def test_explain_reports_every_model(name, encoded):
    from tests.models.conftest import take

    schema, splits = encoded
    features, _ = take(*splits["test"], range(20))
    model = build_model(name, schema)
    details = model.explain(features)
    arrays = details.arrays()
    expected = _expected_explain_shapes(name, model, schema, 20)
    assert sorted(arrays) == sorted(expected)
    for key, shape in expected.items():
        assert isinstance(arrays[key], np.ndarray) and arrays[key].shape == shape, (key, arrays[key].shape)
        assert np.isfinite(arrays[key]).all(), key
    # the reported logits are the ones the model scores with (ESMM: its conditionals cascade)
    out = model(features)
    if name not in ("esmm", "escm2"):  # cascades: outputs are products of conditionals
        for i, task in enumerate(schema.tasks):
            np.testing.assert_allclose(1 / (1 + np.exp(-details.logits[:, i])), np.asarray(out[task])[:, 0],
                                       rtol=1e-5, atol=1e-6)
    for gate in details.gates:  # softmax gates: a distribution over experts per sample and task
        assert (gate.weights >= 0).all() and np.abs(gate.weights.sum(-1) - 1).max() < 1e-5, gate.name
    for scaling in details.scalings:  # PEPNet's Gate NU: gate_scale * sigmoid, per sample and unit
        assert ((scaling.values > 0) & (scaling.values < model.params.gate_scale)).all(), scaling.name
        assert scaling.values.std(axis=0).max() > 0, f"{scaling.name} must vary across samples"
    if name in ("m3oe", "m3oe_aftb"):
        assert sorted(v.key for v in details.architecture) == ["alpha/domain", "alpha/task", "beta/domain",
                                                               "beta/task"]
        for value in details.architecture:  # sigmoid of the raw value, arch_init 1 -> sigmoid(1)
            np.testing.assert_allclose(value.value, 1 / (1 + np.exp(-1.0)), rtol=1e-6)
    else:
        assert details.architecture == ()


def test_pepnet_explain_reports_the_gates_it_applies(encoded):
    """Zeroed Gate NU kernels with out-bias b: every reported value is gate_scale * sigmoid(b)."""
    from tests.models.conftest import take

    schema, splits = encoded
    features, _ = take(*splits["test"], range(8))
    model = build_model("pepnet", schema, {"gate_scale": 3.0, "tower_units": [8]})
    gates = [model.epnet.gate] + list(model.ppnet.gates)
    for i, gate in enumerate(gates):
        for variable in gate.trainable_variables:
            variable.assign(np.zeros(variable.shape, "float32"))
        gate.out.bias.assign(np.full(gate.out.bias.shape, 0.5 * i - 0.5, "float32"))
    details = model.explain(features)
    want = [3.0 / (1 + np.exp(-(0.5 * i - 0.5))) for i in range(len(gates))]
    np.testing.assert_allclose(details.scaling("epnet").values, want[0], rtol=1e-6)
    for i in range(len(gates) - 1):
        np.testing.assert_allclose(details.scaling(f"ppnet_{i}").values, want[i + 1], rtol=1e-6)
