"""Model ids (`ORG/NAME`) resolved through the local Hugging Face cache, never the network.

huggingface_hub stores a downloaded repository as

    <cache>/models--ORG--NAME/refs/<revision>          a file holding the commit hash
    <cache>/models--ORG--NAME/snapshots/<commit>/...   the files of that commit (symlinks
                                                       into blobs/)

and finds `<cache>` from the environment: `HF_HUB_CACHE`, else the legacy
`HUGGINGFACE_HUB_CACHE`, else `$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else
`~/.cache/huggingface/hub`. This module reads that layout itself (the same rules as
`huggingface_hub.constants`), so resolving a model needs neither huggingface_hub nor a network
connection: nothing is downloaded at run time. It is JAX-free (the server's front process
resolves models too).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from jaxinfer.errors import ConfigError

DEFAULT_REVISION = "main"
# A Hub repository id: one "/" between an owner and a name of letters, digits, "-", "_", ".".
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_COMMIT = re.compile(r"[0-9a-f]{40}")


def add_revision_arg(parser, flag: str = "--model") -> None:
    """`--revision REV` for a CLI whose `flag` may name a Hub id (every CLI's one definition)."""
    parser.add_argument("--revision", default=None,
                        help=f"branch, tag or commit of an ORG/NAME {flag} in the Hugging Face "
                        f"cache (default {DEFAULT_REVISION})")


def hub_cache_dir() -> Path:
    """The Hub cache directory huggingface_hub would use in this environment."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.path.expandvars(os.path.expanduser(os.environ[var])))
    if os.environ.get("HF_HOME"):
        home = Path(os.path.expandvars(os.path.expanduser(os.environ["HF_HOME"])))
    else:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        home = Path(xdg) / "huggingface"
    return home / "hub"


def is_repo_id(model: str) -> bool:
    """True for a string shaped like a Hub id (`meta-llama/Llama-3.2-1B`)."""
    return _REPO_ID.fullmatch(model) is not None and ".." not in model


def repo_folder(repo_id: str, cache: Path | None = None) -> Path:
    """`<cache>/models--ORG--NAME` (huggingface_hub's folder name for a model repository)."""
    return (cache or hub_cache_dir()) / ("models--" + repo_id.replace("/", "--"))


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """The snapshot directory of `repo_id` at `revision` (a branch, tag or commit hash; default
    main) in the local cache. Raises ConfigError, one line naming the path looked in."""
    revision = revision or DEFAULT_REVISION
    folder = repo_folder(repo_id)
    ref = folder / "refs" / revision
    commit = None
    if ref.is_file():
        commit = ref.read_text(encoding="utf-8").strip()
    elif _COMMIT.fullmatch(revision):
        commit = revision
    snapshot = folder / "snapshots" / commit if commit else None
    if snapshot is None or not snapshot.is_dir():
        looked = snapshot if snapshot is not None else ref
        raise ConfigError(
            f"--model {repo_id!r} (revision {revision}) is not in the Hugging Face cache "
            f"(looked in {looked}); nothing is downloaded at run time: fetch it first "
            f"(`hf download {repo_id}`), or set HF_HUB_CACHE/HF_HOME to the cache that has it")
    return snapshot
