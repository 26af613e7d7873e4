"""Parse TF Serving's text-proto config files (serving/config/) into their messages.

models.config parses into `ModelServerConfig`, which tensorflow-serving-api ships. The
batching and monitoring messages (`BatchingParameters`, `MonitoringConfig`) are not in
that package (their .proto files live in the server's source tree only), so when
`tensorflow_serving` lacks them this module declares them itself with the same package,
message names, field names, numbers and types, so a file that parses here parses in
tensorflow_model_server too (and unknown or misspelled fields fail here as they would
there). Only the fields of these messages that TF Serving documents are declared.
"""
from __future__ import annotations

import functools
import importlib
from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

from mdmt_tf.errors import ConfigError

_F = descriptor_pb2.FieldDescriptorProto
# message -> [(field, number, type, label, type_name)]; proto3, package tensorflow.serving
_DECLARED = {
    "BatchingParameters": [
        ("max_batch_size", 1, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".google.protobuf.Int64Value"),
        ("batch_timeout_micros", 2, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".google.protobuf.Int64Value"),
        ("max_enqueued_batches", 3, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".google.protobuf.Int64Value"),
        ("num_batch_threads", 4, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".google.protobuf.Int64Value"),
        ("thread_pool_name", 5, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".google.protobuf.StringValue"),
        ("allowed_batch_sizes", 6, _F.TYPE_INT64, _F.LABEL_REPEATED, None),
        ("pad_variable_length_inputs", 7, _F.TYPE_BOOL, _F.LABEL_OPTIONAL, None),
    ],
    "PrometheusConfig": [
        ("enable", 1, _F.TYPE_BOOL, _F.LABEL_OPTIONAL, None),
        ("path", 2, _F.TYPE_STRING, _F.LABEL_OPTIONAL, None),
    ],
    "MonitoringConfig": [
        ("prometheus_config", 1, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".tensorflow.serving.PrometheusConfig"),
    ],
}
# message -> modules of tensorflow_serving that define it in some releases
_OFFICIAL = {
    "BatchingParameters": ("tensorflow_serving.servables.tensorflow.session_bundle_config_pb2",),
    "MonitoringConfig": ("tensorflow_serving.config.monitoring_config_pb2",),
    "ModelServerConfig": ("tensorflow_serving.config.model_server_config_pb2",),
}


@functools.lru_cache(maxsize=None)
def _declared_classes() -> dict:
    from google.protobuf import wrappers_pb2

    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
    file = descriptor_pb2.FileDescriptorProto(name="mdmt_serving/declared_configs.proto",
                                              package="tensorflow.serving", syntax="proto3",
                                              dependency=["google/protobuf/wrappers.proto"])
    for message, fields in _DECLARED.items():
        proto = file.message_type.add(name=message)
        for name, number, kind, label, type_name in fields:
            field = proto.field.add(name=name, number=number, type=kind, label=label)
            if type_name:
                field.type_name = type_name
    pool.Add(file)
    return {m: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"tensorflow.serving.{m}"))
            for m in _DECLARED}


def message_class(name: str):
    """TF Serving's class for config message `name`, or this module's declaration of it."""
    for module in _OFFICIAL.get(name, ()):
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    if name in _DECLARED:
        return _declared_classes()[name]
    raise ConfigError(f"unknown TF Serving config message {name!r}; known: {sorted(_OFFICIAL)}")


def parse_config(path: str | Path, message: str):
    """Parse the text proto at `path` as TF Serving message `message` (e.g.
    "ModelServerConfig"); a syntax error or unknown field is a ConfigError naming the line."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        return text_format.Parse(path.read_text(), message_class(message)())
    except text_format.ParseError as err:
        raise ConfigError(f"{path}: not a valid {message} text proto: {err}") from None
