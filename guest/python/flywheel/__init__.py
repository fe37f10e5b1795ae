"""Flywheel's Python SDK for guest plugins (componentize-py, world `flywheel:llm/plugin`).

Everything the SDK uses is imported here, at load time: a plugin is pre-initialized when it
is built and runs with no filesystem, so a module imported for the first time while a
request is being handled cannot be found (`ModuleNotFoundError`). Import what your plugin
needs at the top of its module too.
"""

import codecs  # noqa: F401  (pre-loaded: see above)
import json  # noqa: F401
import math  # noqa: F401
import random  # noqa: F401

from .candidates import Candidates, Want
from .config import all_config, config
from .errors import FlywheelError, HttpError, InferenceError, ModelError, ProtocolError, QuotaError, to_http_error
from .generate import Generation
from .http import App, ClientGone, Request, Responder, SseStream
from .model import Model, Session, feed_together
from .sampling import DEFAULT_HOST_CANDIDATES, Sampler, fresh_seed, log_softmax, softmax

__all__ = [
    "App",
    "Candidates",
    "ClientGone",
    "DEFAULT_HOST_CANDIDATES",
    "FlywheelError",
    "Generation",
    "HttpError",
    "InferenceError",
    "Model",
    "ModelError",
    "ProtocolError",
    "QuotaError",
    "Request",
    "Responder",
    "Sampler",
    "Session",
    "SseStream",
    "Want",
    "all_config",
    "config",
    "feed_together",
    "fresh_seed",
    "log_softmax",
    "max_tokens",
    "softmax",
    "to_http_error",
]


def max_tokens(requested, default, context_length):
    """A request's `max_tokens`: the default when absent, a 400 when not a positive integer."""
    if requested is None:
        return min(default, context_length)
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
        raise HttpError.bad_request(f"max_tokens must be a positive integer, got {requested!r}", "max_tokens")
    return min(requested, context_length)
