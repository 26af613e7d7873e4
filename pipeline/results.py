"""Read a finished run back from ML Metadata: the Evaluator's metrics per (domain, task),
the blessing, where the model was pushed, and each component's wall time."""
from __future__ import annotations

import dataclasses

from ml_metadata.metadata_store import metadata_store
from ml_metadata.proto import metadata_store_pb2


@dataclasses.dataclass
class RunSummary:
    auc: dict            # "<domain>/<task>" and "(all)/<task>" -> AUC
    logloss: dict
    blessed: bool | None
    pushed_to: str | None
    evaluation_uri: str | None
    component_seconds: dict  # component id -> seconds (latest execution of each)


def store_for(metadata_path: str) -> metadata_store.MetadataStore:
    config = metadata_store_pb2.ConnectionConfig()
    config.sqlite.filename_uri = metadata_path
    config.sqlite.connection_mode = metadata_store_pb2.SqliteMetadataSourceConfig.READONLY
    return metadata_store.MetadataStore(config)


def _latest(store, type_name: str):
    artifacts = store.get_artifacts_by_type(type_name)
    return max(artifacts, key=lambda a: a.id) if artifacts else None


def _prop(artifact, name):
    value = artifact.custom_properties.get(name)
    if value is None:
        return None
    return value.int_value if value.HasField("int_value") else value.string_value


def component_seconds(store) -> dict[str, float]:
    """Wall time of the latest execution of each component (cached ones take ~0 s)."""
    out: dict[str, tuple[int, float]] = {}
    for execution in store.get_executions():
        prop = execution.custom_properties.get("__tfx_node_id__") or execution.properties.get("component_id")
        name = prop.string_value if prop is not None else execution.type
        seconds = (execution.last_update_time_since_epoch - execution.create_time_since_epoch) / 1000.0
        if name not in out or execution.id > out[name][0]:
            out[name] = (execution.id, seconds)
    return {name: seconds for name, (_, seconds) in out.items()}


def summarize(metadata_path: str, domain_key: str) -> RunSummary:
    import tensorflow_model_analysis as tfma

    store = store_for(metadata_path)
    evaluation = _latest(store, "ModelEvaluation")
    auc, logloss = {}, {}
    if evaluation is not None:
        result = tfma.load_eval_result(evaluation.uri)
        for slice_key, metrics in result.slicing_metrics:
            where = "(all)" if not slice_key else str(dict(slice_key).get(domain_key, slice_key))
            if isinstance(where, bytes):
                where = where.decode()
            for task, per_output in metrics.items():
                values = per_output.get("", per_output)
                for name, target in (("auc", auc), ("binary_crossentropy", logloss)):
                    entry = values.get(name)
                    if entry is not None:
                        target[f"{where}/{task}"] = entry.get("doubleValue")
    blessing = _latest(store, "ModelBlessing")
    pushed = _latest(store, "PushedModel")
    return RunSummary(auc=auc, logloss=logloss,
                      blessed=bool(_prop(blessing, "blessed")) if blessing is not None else None,
                      pushed_to=_prop(pushed, "pushed_destination") if pushed is not None and _prop(pushed, "pushed")
                      else None,
                      evaluation_uri=evaluation.uri if evaluation is not None else None,
                      component_seconds=component_seconds(store))
