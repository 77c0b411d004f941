"""Where and at which commit a measurement was made: the fields every benchmark row carries
(STYLE.md rule 17). Shared by the bench, the kernel bench and the serving load generator."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import jax


def git_sha() -> str:
    """The checkout's commit; JAXINFER_GIT_SHA wins (a copied tree may have no .git)."""
    if os.environ.get("JAXINFER_GIT_SHA"):
        return os.environ["JAXINFER_GIT_SHA"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name() -> str:
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', 'unknown')}"
