import pytest

from mdmt_tf.errors import SpecError
from mdmt_tf.spec import DatasetSpec

MINIMAL = """\
domain: domain_id
tasks: [click, like]
sparse: [user_id, item_id, gender, occupation, zip, cate_id]
dense: [age]
"""


def test_minimal_yaml_loads(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(MINIMAL)
    spec = DatasetSpec.from_yaml(path)
    assert spec.domain == "domain_id"
    assert spec.tasks == ("click", "like")
    assert spec.sparse == ("user_id", "item_id", "gender", "occupation", "zip", "cate_id")
    assert spec.dense == ("age",)
    assert spec.domains is None
    assert spec.features == ("domain_id", *spec.sparse, "age")
    assert spec.columns[-2:] == ("click", "like")


def test_yaml_round_trip(tmp_path):
    spec = DatasetSpec(domain="d", tasks=["a"], sparse=["x"], dense=[], domains=["p", "q"])
    spec.to_yaml(tmp_path / "s.yaml")
    assert DatasetSpec.from_yaml(tmp_path / "s.yaml") == spec


@pytest.mark.parametrize("data, fragment", [
    ({"tasks": ["a"], "sparse": ["x"]}, "'domain' is required"),
    ({"domain": "d", "sparse": ["x"]}, "'tasks' is required"),
    ({"domain": "d", "tasks": [], "sparse": ["x"]}, "at least one label"),
    ({"domain": "d", "tasks": ["a"]}, "lists no features"),
    ({"domain": "d", "tasks": ["a"], "sparse": ["a"]}, "appears twice"),
    ({"domain": "d", "tasks": ["a"], "sparse": ["x"], "dense": ["x"]}, "appears twice"),
    ({"domain": "d", "tasks": ["a"], "sparse": ["1x"]}, "not usable as a feature name"),
    ({"domain": "d", "tasks": ["a"], "sparse": ["x"], "label": "a"}, "unknown spec key(s) ['label']"),
    ({"domain": "d", "tasks": ["a"], "sparse": ["x"], "domains": ["p", "p"]}, "distinct"),
    ({"domain": "d", "tasks": "a", "sparse": {"x": 1}}, "must be a list"),
])
def test_invalid_specs_name_the_problem(data, fragment):
    with pytest.raises(SpecError) as err:
        DatasetSpec.from_dict(data, source="my.yaml")
    assert fragment in str(err.value)
    assert "my.yaml" in str(err.value)


def test_missing_and_invalid_yaml_files(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        DatasetSpec.from_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("domain: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        DatasetSpec.from_yaml(bad)
