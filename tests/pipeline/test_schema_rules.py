from tensorflow_metadata.proto.v0 import anomalies_pb2, schema_pb2

from mdmt_tf.spec import DatasetSpec
from pipeline.schema_rules import anomaly_messages, curate

SPEC = DatasetSpec(domain="d", tasks=["click"], sparse=["user", "gender"], dense=["age"])


def _inferred():
    schema = schema_pb2.Schema()
    schema.feature.add(name="d", type=schema_pb2.BYTES, domain="d")
    schema.string_domain.add(name="d", value=["a", "b"])
    schema.feature.add(name="user", type=schema_pb2.BYTES)
    schema.feature.add(name="gender", type=schema_pb2.BYTES, domain="gender")
    schema.string_domain.add(name="gender", value=["F", "M"])
    schema.feature.add(name="click", type=schema_pb2.INT)
    schema.feature.add(name="age", type=schema_pb2.BYTES)  # bad training data inferred as text
    return schema


def test_curate_imposes_the_spec():
    curated = {f.name: f for f in curate(_inferred(), SPEC).feature}
    assert all(curated[n].presence.min_fraction == 1.0 for n in SPEC.columns)
    click = curated["click"]
    assert click.type == schema_pb2.INT and (click.int_domain.min, click.int_domain.max) == (0, 1)
    assert "SERVING" in click.not_in_environment
    assert curated["age"].type == schema_pb2.FLOAT
    assert curated["gender"].WhichOneof("domain_info") is None  # new ids are fine: OOV
    assert curated["d"].domain == "d"  # a new domain value is an anomaly


def test_missing_spec_column_is_added_so_its_absence_is_reported():
    schema = _inferred()
    del schema.feature[1]  # user
    curated = {f.name: f for f in curate(schema, SPEC).feature}
    assert curated["user"].type == schema_pb2.BYTES and curated["user"].presence.min_fraction == 1.0


def test_anomaly_messages_name_split_and_feature(tmp_path):
    anomalies = anomalies_pb2.Anomalies()
    info = anomalies.anomaly_info["click"]
    info.short_description = "Out-of-range values"
    info.reason.add(description="Unexpectedly large value: 2.")
    (tmp_path / "Split-train").mkdir()
    (tmp_path / "Split-train" / "SchemaDiff.pb").write_bytes(anomalies.SerializeToString())
    (tmp_path / "Split-test").mkdir()
    (tmp_path / "Split-test" / "SchemaDiff.pb").write_bytes(anomalies_pb2.Anomalies().SerializeToString())
    assert anomaly_messages(str(tmp_path)) == [
        "split 'train', feature 'click': Out-of-range values (Unexpectedly large value: 2.)"]
