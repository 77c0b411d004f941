"""Speculative decoding: proposers (draft model, n-gram lookup, layer-skip, plug-ins), the
verifiers, and the research API they are written in (`api.py`; docs/decoding.md).

`config` imports no JAX (the server's front parses `--speculative-config` with it); the other
modules are device code."""
