"""Schema curation from the dataset spec, and reading ExampleValidator's anomalies.

SchemaGen infers a schema from the training split, so bad training data (a label 2, a
non-numeric age) would be written into the schema and pass validation. `curate` imposes
what the spec says regardless of the data:
  * every spec column is required (presence 1.0); a column missing from the data is added,
    so its absence is reported ("column dropped");
  * task labels are INT in {0, 1};
  * dense features are numeric (FLOAT unless inferred INT);
  * sparse features keep their inferred type but lose inferred value domains: new ids are
    expected and go to the OOV bucket;
  * the domain column keeps its inferred value domain: a new domain value is an anomaly;
  * labels are not expected at serving time (SERVING environment).
"""
from __future__ import annotations

import glob
import os

from tensorflow_metadata.proto.v0 import anomalies_pb2, schema_pb2

from mdmt_tf.spec import DatasetSpec


class DataAnomaliesError(RuntimeError):
    """ExampleValidator found anomalies: the run stops before Transform and training."""


def _feature(schema: schema_pb2.Schema, name: str, default_type) -> schema_pb2.Feature:
    for feature in schema.feature:
        if feature.name == name:
            return feature
    feature = schema.feature.add(name=name, type=default_type)
    return feature


def curate(schema: schema_pb2.Schema, spec: DatasetSpec) -> schema_pb2.Schema:
    curated = schema_pb2.Schema()
    curated.CopyFrom(schema)
    for env in ("TRAINING", "SERVING"):
        if env not in curated.default_environment:
            curated.default_environment.append(env)
    for name in spec.columns:
        default = schema_pb2.INT if name in spec.tasks else (
            schema_pb2.FLOAT if name in spec.dense else schema_pb2.BYTES)
        feature = _feature(curated, name, default)
        feature.presence.min_fraction = 1.0
        feature.presence.min_count = 1
        if name in spec.tasks:
            feature.type = schema_pb2.INT
            feature.ClearField("domain_info") if feature.HasField("domain_info") else None
            feature.int_domain.min = 0
            feature.int_domain.max = 1
            feature.int_domain.is_categorical = True
            if "SERVING" not in feature.not_in_environment:
                feature.not_in_environment.append("SERVING")
        elif name in spec.dense:
            if feature.type not in (schema_pb2.INT, schema_pb2.FLOAT):
                feature.type = schema_pb2.FLOAT
            if feature.WhichOneof("domain_info") in ("domain", "string_domain"):
                feature.ClearField(feature.WhichOneof("domain_info"))
        elif name in spec.sparse:
            if feature.WhichOneof("domain_info") is not None:
                feature.ClearField(feature.WhichOneof("domain_info"))
    # string domains referenced by features we cleared are left unused; drop them
    used = {f.domain for f in curated.feature if f.WhichOneof("domain_info") == "domain"}
    keep = [d for d in curated.string_domain if d.name in used]
    del curated.string_domain[:]
    curated.string_domain.extend(keep)
    return curated


def anomaly_messages(anomalies_uri: str) -> list[str]:
    """One line per anomaly: "split 'train', feature 'like': Out-of-range values (...)"."""
    lines = []
    for path in sorted(glob.glob(os.path.join(anomalies_uri, "Split-*", "SchemaDiff.pb"))):
        split = os.path.basename(os.path.dirname(path))[len("Split-"):]
        anomalies = anomalies_pb2.Anomalies()
        with open(path, "rb") as fh:
            anomalies.ParseFromString(fh.read())
        for feature, info in sorted(anomalies.anomaly_info.items()):
            detail = "; ".join(r.description for r in info.reason if r.description) or info.description
            lines.append(f"split '{split}', feature '{feature}': {info.short_description} ({detail})")
        if anomalies.HasField("dataset_anomaly_info"):
            info = anomalies.dataset_anomaly_info
            lines.append(f"split '{split}', dataset: {info.short_description} ({info.description})")
    return lines
