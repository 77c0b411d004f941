"""jaxinfer: a JAX/XLA inference runtime for Llama-family models."""

__version__ = "0.1.0"
