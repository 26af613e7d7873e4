"""Two small custom components: SchemaCurator and AnomalyGate (see schema_rules.py).

No `from __future__ import annotations` here: TFX reads the real type annotations."""

import json
import os

from tfx import v1 as tfx
from tfx.types.standard_artifacts import ExampleAnomalies, Schema

SCHEMA_FILE = "schema.pbtxt"


@tfx.dsl.components.component
def SchemaCurator(schema: tfx.dsl.components.InputArtifact[Schema],
                  curated_schema: tfx.dsl.components.OutputArtifact[Schema],
                  spec: tfx.dsl.components.Parameter[str]) -> None:
    """Impose the dataset spec on SchemaGen's inferred schema."""
    import tensorflow_data_validation as tfdv

    from mdmt_tf.spec import DatasetSpec

    from .schema_rules import curate

    inferred = tfdv.load_schema_text(os.path.join(schema.uri, SCHEMA_FILE))
    curated = curate(inferred, DatasetSpec.from_dict(json.loads(spec)))
    tfdv.write_schema_text(curated, os.path.join(curated_schema.uri, SCHEMA_FILE))


@tfx.dsl.components.component
def AnomalyGate(anomalies: tfx.dsl.components.InputArtifact[ExampleAnomalies]) -> None:
    """Fail the run when ExampleValidator found anomalies, naming split, feature and problem."""
    from absl import logging

    from .schema_rules import DataAnomaliesError, anomaly_messages

    messages = anomaly_messages(anomalies.uri)
    if messages:
        raise DataAnomaliesError("the data does not match the schema; nothing is trained or pushed: "
                                 + " | ".join(messages))
    logging.info("AnomalyGate: no anomalies in %s", anomalies.uri)
