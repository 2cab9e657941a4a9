"""Routes of the local API (see docs/agent.md for request and answer formats).

    POST /v1/predict                  JSON {"inputs": {...}, "model": NAME?} | .npy | .npz body
    POST /v1/models/<name>/predict    the same, naming the model in the path
    GET  /v1/health                   200 when at least one model serves, 503 otherwise
    GET  /v1/models                   the models being served and the store's state
    POST /v1/samples                  JSON {"inputs": {...}, "labels": [...], "model": NAME?}: labelled
                                      samples kept for on-device (federated) training
    POST /v1/reload                   (loopback / Unix socket only) swap to the store's active versions
    GET  /metrics                     Prometheus text format
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from edge_agent import codec
from edge_agent.errors import RequestError
from edge_agent.httpd import Request, Response, error_response, json_response
from edge_agent.metrics import CONTENT_TYPE as METRICS_TYPE
from export.runtimes import InputError

if TYPE_CHECKING:
    from edge_agent.daemon import Agent

_BINARY = (codec.NPY, codec.NPZ, "application/octet-stream")


class Api:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.max_batch = agent.config.max_batch
        self.max_inflate = codec.NPZ_INFLATE_FACTOR * agent.config.max_body_bytes
        self._get = {"/v1/health": self.health, "/v1/models": self.models, "/metrics": self.metrics}
        self._post = {"/v1/predict": self.predict, "/v1/samples": self.samples, "/v1/reload": self.reload}

    def __call__(self, req: Request) -> Response:
        start = time.perf_counter()
        try:
            return self._route(req)
        except Exception as exc:  # a bug: answered 500 (by the server) and counted here, not hidden
            self.agent.metrics.observe(req.query.get("model") or "-", 500, time.perf_counter() - start, "internal")
            raise RuntimeError(f"{req.method} {req.path}: {type(exc).__name__}: {exc}") from exc

    def _route(self, req: Request) -> Response:
        routes = self._post if req.method == "POST" else self._get if req.method == "GET" else None
        handler = routes.get(req.path) if routes is not None else None
        if handler is None and req.method == "POST" and req.path.startswith("/v1/models/") and req.path.endswith("/predict"):
            name = req.path[len("/v1/models/") : -len("/predict")]
            return self.predict(req, name)
        if handler is None:
            if req.path in self._get or req.path in self._post:
                return error_response(405, "method_not_allowed", f"{req.method} is not allowed on {req.path}")
            return error_response(404, "not_found", f"no such endpoint: {req.path}")
        return handler(req)

    # ------------------------------------------------------------------------------------------ predict

    def predict(self, req: Request, name: str | None = None) -> Response:
        start = time.perf_counter()
        agent = self.agent
        model = None
        try:
            ctype = req.content_type or codec.JSON
            doc = None
            if ctype == codec.JSON:
                doc = codec.parse_json(req.body)
                name = name or req.query.get("model") or doc.get("model")
            elif ctype in _BINARY:
                name = name or req.query.get("model")
            else:
                raise RequestError(415, "unsupported_media_type", f"Content-Type {ctype!r} is not accepted; use {codec.JSON}, {codec.NPY} or {codec.NPZ}")
            model = agent.model(name)
            specs = model.runtime.inputs
            if doc is not None:
                inputs = codec.json_inputs(doc, specs)
            else:
                inputs = codec.binary_inputs(req.body, codec.NPZ if ctype == codec.NPZ else codec.NPY, specs,
                                             req.query.get("input"), self.max_inflate)
            codec.check_values(inputs, self.max_batch)
            try:
                outputs = model.runtime.run(inputs)
            except InputError as exc:
                raise RequestError(400, "bad_input", str(exc)) from exc
            accept = req.headers.get("accept", "")
            headers = [("X-Model-Name", model.name), ("X-Model-Version", str(model.version))]
            if codec.NPY in accept and len(outputs) == 1:
                ((out_name, value),) = outputs.items()
                resp = Response(200, codec.npy_bytes(value), codec.NPY, [*headers, ("X-Output-Name", out_name)])
            elif codec.NPZ in accept or codec.NPY in accept:
                resp = Response(200, codec.npz_bytes(outputs), codec.NPZ, headers)
            else:
                resp = Response(200, codec.json_outputs(outputs, model.ref), codec.JSON, headers)
            seconds = time.perf_counter() - start
            agent.metrics.observe(model.name, 200, seconds)
            agent.telemetry.observe(model.name, model.version, seconds, inputs, None)
            return resp
        except RequestError as exc:
            seconds = time.perf_counter() - start
            label = model.name if model is not None else "-"
            agent.metrics.observe(label, exc.status, seconds, exc.code)
            if model is not None:
                agent.telemetry.observe(model.name, model.version, seconds, None, exc.code)
            extra: dict[str, Any] = dict(exc.fields)
            if model is not None:
                extra["model"] = model.ref
            return error_response(exc.status, exc.code, str(exc), **extra)

    # ------------------------------------------------------------------------------------------ samples

    def samples(self, req: Request) -> Response:
        """Store labelled samples (inputs checked against the served model's specs, like a prediction)."""
        from edge_agent.training import DatasetError

        try:
            if (req.content_type or codec.JSON) != codec.JSON:
                raise RequestError(415, "unsupported_media_type", f"samples are posted as {codec.JSON}")
            doc = codec.parse_json(req.body)
            model = self.agent.model(req.query.get("model") or doc.get("model"))
            inputs = model.runtime.validate(codec.json_inputs(doc, model.runtime.inputs))
            codec.check_values(inputs, self.max_batch)
            labels = doc.get("labels")
            batch = {len(v) for v in inputs.values()}
            if not isinstance(labels, list) or len(batch) != 1 or len(labels) != batch.pop():
                raise RequestError(400, "bad_labels", '"labels" must be a list with one integer per input row')
            if any(isinstance(v, int) and v >= 2**31 for v in labels):
                raise RequestError(400, "bad_labels", '"labels" must be integers below 2**31 (class indexes)')
            store = self.agent.samples
            ids = [store.add({k: v[i] for k, v in inputs.items()}, label) for i, label in enumerate(labels)]
        except InputError as exc:
            return error_response(400, "bad_input", str(exc))
        except DatasetError as exc:
            return error_response(400, "bad_sample", str(exc))
        except RequestError as exc:
            return error_response(exc.status, exc.code, str(exc), **exc.fields)
        return json_response(200, {"stored": len(ids), "total": store.count(), "model": model.ref})

    # ------------------------------------------------------------------------------------------ others

    def health(self, req: Request) -> Response:
        doc = self.agent.health()
        return json_response(200 if doc["status"] == "ok" else 503, doc)

    def models(self, req: Request) -> Response:
        return json_response(200, self.agent.describe())

    def metrics(self, req: Request) -> Response:
        return Response(200, self.agent.metrics.render(), METRICS_TYPE)

    def reload(self, req: Request) -> Response:
        if not req.local:
            return error_response(403, "forbidden", "reload is accepted only from loopback or the Unix socket")
        return json_response(200, self.agent.reload())
