"""A DEVELOPMENT STAND-IN for tensorflow_model_server (TF Serving's REST and gRPC APIs), for
machines without the binary or Docker. Not for production: production serves with TF
Serving (serving/README.md). Nothing outside this package and its tests imports it, except
`mdmt serve` and `mdmt bench serve` (which start it).

  server.py        options, LocalServer (repository + REST + gRPC), command line
  repository.py    the versions under a base path: load, switch, roll back, retry, report
  servable.py      one loaded version: signatures, predict in bounded slices, warmup
  api.py           predict / status / metadata, independent of the wire; request caps
  rest.py          TF Serving's REST routes;  rest_codec.py  its JSON, server side
  http.py          the HTTP/1.1 server: one I/O thread, a bounded worker pool, timeouts
  grpc_service.py  PredictionService / ModelService
  signatures.py    SignatureDef-based input checks;  status.py  canonical status codes

    python -m serving.devserver --model-base-path DIR
"""
