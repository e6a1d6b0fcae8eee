"""An HTTP front end for `Server`: the standard library's threading HTTP server, no new dependency.

    POST /v1/generate  {"prompt", "max_new_tokens"?, "request_id"?, "critical"?, "seed"?, "schema"?, "tool"?}
    GET  /healthz      what serves now (from memory, no registry call)
    GET  /v1/stats     requests generating and queued now; served, busy, over budget, timed out, failed so far

Status codes (the body's `status` is the log entry's):

    200 ok            answered; the body is a subset of the log entry
    400 over_budget   prompt or max_new_tokens over the server's budget (logged)
    400 bad_request   malformed JSON, unknown field, empty prompt, unusable schema/tool (not logged: no model ran)
    503 busy          every generation slot taken and the queue full: answered at once, logged, retry later
    504 timeout       not answered within request_timeout_s, queueing included (logged)
    500 error         routing or generation failed, e.g. the production alias names an unapproved version (logged)

Each request runs in its own thread; backpressure is the server's (serving/admission.py), so a
busy answer costs a JSONL line and nothing else. `shutdown()` stops accepting, lets every request
already admitted or queued finish and be logged, then closes: nothing answered goes unlogged.
Connections close after each response (HTTP/1.0), so an idle client cannot hold a shutdown open.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, StringConstraints, ValidationError

from quant_pipeline.release.reference import ServingError
from quant_pipeline.serving.admission import BadRequest, RequestRefused
from quant_pipeline.serving.server import Server

LOG = logging.getLogger(__name__)
MAX_BODY_BYTES = 1 << 20
# A client's request ID becomes an MLflow tag and a search filter: the registry's name rule, plus ':'.
RequestId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")]
RESPONSE_FIELDS = (
    "request_id", "status", "arm", "model_version", "artifact_id", "content_hash", "output", "prompt_tokens",
    "output_tokens", "latency_s", "refused", "validation", "fallback", "error",
)  # fmt: skip


class GenerateRequest(BaseModel):
    """The body of POST /v1/generate. Strict: "4" is not a number of tokens, "yes" is not a flag."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    prompt: StrictStr
    max_new_tokens: StrictInt | None = None  # default: the server's budget
    request_id: RequestId | None = None  # default: a fresh UUID; the same ID always takes the same arm
    critical: StrictBool = False
    seed: StrictInt = 0
    output_schema: dict | None = Field(None, alias="schema")  # a JSON Schema the answer should satisfy
    tool: dict | None = None  # a tool signature {"name", "parameters"} the answer should call


def _answer_of(record: dict) -> dict:
    return {k: record.get(k) for k in RESPONSE_FIELDS}


class _Handler(BaseHTTPRequestHandler):
    server_version = "quant-pipeline"
    server: _HTTPServer

    def log_message(self, format: str, *args) -> None:  # the JSONL is the request log; access lines stay debug
        LOG.debug("%s %s", self.address_string(), format % args)

    def _send(self, code: int, body: dict) -> None:
        data = json.dumps(body, ensure_ascii=False, default=str).encode("utf-8")
        self.send_response(code)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        backend = self.server.backend
        if self.path == "/healthz":
            self._send(200, {"status": "draining" if self.server.draining else "ok", **backend.state()})
        elif self.path == "/v1/stats":
            self._send(200, backend.stats())
        else:
            self._send(404, {"status": "bad_request", "error": f"no such path {self.path}: GET /healthz, /v1/stats"})

    def do_POST(self) -> None:
        arrival = time.monotonic()
        if self.path != "/v1/generate":
            self._send(404, {"status": "bad_request", "error": f"no such path {self.path}: POST /v1/generate"})
            return
        try:
            request = self._parse()
        except BadRequest as e:
            self._send(e.http_status, {"status": "bad_request", "error": str(e)})
            return
        backend = self.server.backend
        request_id = request.request_id or str(uuid.uuid4())
        try:
            record = backend.generate(
                request.prompt,
                request.max_new_tokens if request.max_new_tokens is not None else backend.config.max_new_tokens,
                seed=request.seed,
                critical=request.critical,
                request_id=request_id,
                schema=request.output_schema,
                tool=request.tool,
                deadline=arrival + backend.config.request_timeout_s,
            )
        except BadRequest as e:
            self._send(e.http_status, {"request_id": request_id, "status": "bad_request", "error": str(e)})
        except RequestRefused as e:
            self._send(e.http_status, _answer_of(e.record))
        except Exception as e:  # logged by the server with status error
            kind = "" if isinstance(e, ServingError) else f"{type(e).__name__}: "
            self._send(500, {"request_id": request_id, "status": "error", "error": f"{kind}{e}"})
        else:
            self._send(200, _answer_of(record))

    def _parse(self) -> GenerateRequest:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise BadRequest("a JSON body with a Content-Length header is required") from None
        if length > MAX_BODY_BYTES:
            raise BadRequest(f"body of {length} bytes is over the limit of {MAX_BODY_BYTES}")
        try:
            body = json.loads(self.rfile.read(length).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise BadRequest(f"body is not UTF-8 JSON: {e}") from None
        try:
            return GenerateRequest.model_validate(body)
        except ValidationError as e:
            first = e.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "(body)"
            raise BadRequest(f"field `{field}`: {first['msg']}") from None


class _HTTPServer(ThreadingHTTPServer):
    request_queue_size = 128  # a burst of connections is accepted and answered (busy if need be), not reset
    block_on_close = True  # server_close() joins every request thread: the drain
    draining = False
    backend: Server


class HttpFrontend:
    """`Server` over HTTP on `host:port` (port 0: any free port; `url` says which)."""

    def __init__(self, server: Server, host: str = "127.0.0.1", port: int = 0):
        try:
            self.httpd = _HTTPServer((host, port), _Handler)
        except OSError as e:
            raise ServingError(f"cannot listen on {host}:{port}: {e.strerror or e}; pick another --port") from None
        self.httpd.backend = server
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HttpFrontend:
        """Accept requests on a background thread (returns at once)."""
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
        self._thread.start()
        return self

    def shutdown(self) -> None:
        """Stop accepting, let every admitted or queued request finish and be logged, then close."""
        if self.httpd.draining:
            return
        self.httpd.draining = True
        if self._thread is not None:
            self.httpd.shutdown()  # the accept loop ends; request threads go on
            self._thread.join()
        self.httpd.server_close()  # closes the socket, then joins the request threads

    def __enter__(self) -> HttpFrontend:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()
