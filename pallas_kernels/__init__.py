"""Pallas GPU kernels, each beside a plain-JAX reference with the same arguments.

This package knows nothing about models; `jaxinfer/ops.py` chooses between kernel and reference.
"""
