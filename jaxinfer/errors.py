"""The error types of jaxinfer.

Errors are raised at the boundaries (config construction, checkpoint load, request
admission) and carry a message a user can act on without reading a traceback.
"""


class JaxinferError(Exception):
    """Base of all jaxinfer errors."""


class ConfigError(JaxinferError, ValueError):
    """A model, engine or server configuration is invalid or unsupported."""


class CheckpointError(JaxinferError):
    """A checkpoint cannot be read: missing, truncated or mis-shaped tensors, bad files."""


class RequestError(JaxinferError, ValueError):
    """A request is invalid (returned to gRPC callers as INVALID_ARGUMENT)."""


class CapacityError(JaxinferError):
    """The engine is out of a resource (pages, slots); the caller requeues, never crashes."""


class UnavailableError(JaxinferError):
    """The engine is not accepting work now (warming up, draining, stopped): gRPC UNAVAILABLE."""


class PreconditionError(JaxinferError):
    """The request is well formed but this engine cannot serve it (gRPC FAILED_PRECONDITION),
    e.g. text or stop strings for a model that has no tokenizer."""


class EngineDeadError(UnavailableError):
    """The engine core process stopped; every request in flight ends UNAVAILABLE."""
