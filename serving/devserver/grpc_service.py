"""TF Serving's gRPC services: PredictionService (Predict, GetModelMetadata) and
ModelService (GetModelStatus).

Errors carry the canonical code of the StatusError (INVALID_ARGUMENT, NOT_FOUND...) and
its message as details. As in TF Serving, an unknown signature name is
FAILED_PRECONDITION over gRPC (the REST API reports it as INVALID_ARGUMENT), and the
tensors' dtypes must match the signature exactly (no conversion, unlike REST's JSON).
Classify, Regress, MultiInference and HandleReloadConfigRequest are UNIMPLEMENTED here.

gRPC itself refuses messages beyond its receive limit with RESOURCE_EXHAUSTED; the limit
is set to twice --max-request-bytes (plus 1 MiB) so that a moderately oversized request
reaches the handler and gets INVALID_ARGUMENT naming the limit. A request of more rows
(0th dimension of its tensors) than --max-request-rows gets INVALID_ARGUMENT before its
tensors are converted. Calls run on a pool of `workers` threads; gRPC's core holds the
connections, so idle or stalled clients cost no thread.
"""
from __future__ import annotations

import contextlib
import logging
from concurrent import futures

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import model_service_pb2_grpc, predict_pb2, prediction_service_pb2_grpc

from .api import ModelApi, ModelRequest
from .status import StatusError, invalid

log = logging.getLogger("serving")


def model_request(spec) -> ModelRequest:
    choice = spec.WhichOneof("version_choice")
    return ModelRequest(spec.name, spec.version.value if choice == "version" else None,
                        spec.version_label if choice == "version_label" else None)


@contextlib.contextmanager
def _status(context):
    """Turn StatusError (and any bug) into the RPC's status."""
    try:
        yield
    except StatusError as err:
        context.abort(err.grpc_code, err.message)
    except Exception as err:  # a server bug, never the client's fault
        log.exception("internal error in a gRPC call")
        context.abort(grpc.StatusCode.INTERNAL, f"Internal error: {type(err).__name__}: {err}")


def _to_array(alias: str, proto) -> np.ndarray:
    try:
        return tf.make_ndarray(proto)
    except Exception:  # unsupported dtype, values that do not fill the shape...
        raise invalid(f"tensor parsing error: {alias}") from None


def _unimplemented(what: str):
    def method(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{what} is not implemented by the mdmt development server; "
                                                     "tensorflow_model_server implements it")
    return method


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, api: ModelApi):
        self.api = api

    def Predict(self, request, context):
        with _status(context):
            self.api.check_size(request.ByteSize())
            self.api.check_rows(max((t.tensor_shape.dim[0].size for t in request.inputs.values()
                                     if t.tensor_shape.dim), default=0))
            servable = self.api.servable(model_request(request.model_spec))
            signature = request.model_spec.signature_name or "serving_default"
            if servable.find_signature(signature) is None:
                raise StatusError("FAILED_PRECONDITION", f'Serving signature key "{signature}" not found.')
            outputs = servable.predict(signature, {k: _to_array(k, v) for k, v in request.inputs.items()})
            return self._response(servable, signature, outputs, list(request.output_filter))

    @staticmethod
    def _response(servable, signature: str, outputs: dict, output_filter: list[str]):
        unknown = [name for name in output_filter if name not in outputs]
        if unknown:
            raise invalid(f"output tensor alias not found in signature: {unknown[0]} Outputs expected to be in the "
                          f"set {{{','.join(sorted(outputs))}}}.")
        response = predict_pb2.PredictResponse()
        response.model_spec.name = servable.name
        response.model_spec.version.value = servable.version
        response.model_spec.signature_name = signature
        for name in output_filter or outputs:
            response.outputs[name].CopyFrom(tf.make_tensor_proto(outputs[name]))
        return response

    def GetModelMetadata(self, request, context):
        with _status(context):
            if not request.HasField("model_spec"):
                raise invalid("Missing ModelSpec")
            return self.api.metadata(model_request(request.model_spec), list(request.metadata_field))

    Classify = _unimplemented("Classify")
    Regress = _unimplemented("Regress")
    MultiInference = _unimplemented("MultiInference")


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, api: ModelApi):
        self.api = api

    def GetModelStatus(self, request, context):
        with _status(context):
            if not request.HasField("model_spec"):
                raise invalid("Missing ModelSpec")
            return self.api.status(model_request(request.model_spec))

    HandleReloadConfigRequest = _unimplemented("HandleReloadConfigRequest")


def make_grpc_server(host: str, port: int, api: ModelApi, workers: int = 8) -> tuple[grpc.Server, int]:
    """A started-later gRPC server with both services; returns it and the bound port."""
    receive_limit = min(2 * api.max_request_bytes + (1 << 20), 2**31 - 1)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
                         options=[("grpc.max_receive_message_length", receive_limit),
                                  ("grpc.max_send_message_length", -1),
                                  ("grpc.so_reuseport", 0)])  # a port in use must fail, not be shared
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionService(api), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(api), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind the gRPC port {host}:{port} (in use?)")
    return server, bound
