"""Serving registered models: resolver, server (canary, shadow, budgets, backpressure), HTTP front end,
MLflow pyfunc, request log, reproduction.

`QuantizedLLM` is exported here as well because versions registered before the models-from-code
pyfunc pickled it by this name."""

from quant_pipeline.release.reference import ServingError
from quant_pipeline.serving.admission import BadRequest, OverBudget, RequestRefused, RequestTimeout, ServerBusy
from quant_pipeline.serving.config import ServingConfig, load_serving_config
from quant_pipeline.serving.http import HttpFrontend
from quant_pipeline.serving.pyfunc import QuantizedLLM
from quant_pipeline.serving.reproduce import reproduce
from quant_pipeline.serving.request_log import find_request, find_trace, read_requests, requests_path
from quant_pipeline.serving.server import Server

__all__ = [
    "BadRequest",
    "HttpFrontend",
    "OverBudget",
    "QuantizedLLM",
    "RequestRefused",
    "RequestTimeout",
    "Server",
    "ServerBusy",
    "ServingConfig",
    "ServingError",
    "find_request",
    "find_trace",
    "load_serving_config",
    "read_requests",
    "reproduce",
    "requests_path",
]
