"""`--model ORG/NAME` from a Hugging Face cache layout built here (huggingface_hub's
`models--ORG--NAME/{blobs,refs,snapshots}`, files as symlinks into blobs, as the hub writes
them) out of the bundled demo model: resolution order, revisions, huggingface_hub's own lookup
agreeing, generate on the cached model, and the one-line errors of generate, serve and
convert for a model that is not there."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from checkpoints.convert import main as convert_main
from checkpoints.convert import resolve_hf_dir
from jaxinfer import generate
from jaxinfer.config import BUNDLED_MODELS, PRESETS, model_source, resolve_model
from jaxinfer.errors import ConfigError
from jaxinfer.hf_cache import hub_cache_dir
from serve.__main__ import main as serve_main

MAIN = "a" * 40
OLD = "b" * 40
DEMO = BUNDLED_MODELS["demo"]


def _snapshot(repo: Path, commit: str, files: list[Path]) -> Path:
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in files:
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        if not blob.exists():
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
        (snap / f.name).symlink_to(Path("../..") / "blobs" / blob.name)
    return snap


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A cache with test-org/demo at main (all files) and at tag `old` (config only)."""
    cache = tmp_path_factory.mktemp("hub")
    repo = cache / "models--test-org--demo"
    files = sorted(p for p in DEMO.iterdir() if p.is_file())
    main = _snapshot(repo, MAIN, files)
    old = _snapshot(repo, OLD, [DEMO / "config.json"])
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN)
    (repo / "refs" / "old").write_text(OLD)
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_CACHE", str(cache))
    yield cache, main, old
    mp.undo()


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert hub_cache_dir() == tmp_path / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub_cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "c"))
    assert hub_cache_dir() == tmp_path / "c"


def test_resolution_order_and_revisions(hub, tmp_path, monkeypatch):
    cache, main, old = hub
    assert model_source("test-org/demo") == main
    assert model_source("test-org/demo", "old") == old
    assert model_source("test-org/demo", OLD) == old  # a commit hash needs no ref
    assert resolve_model("test-org/demo") == str(main)
    # Presets, bundled models and local directories come first, and stay as typed.
    assert model_source("dummy") is PRESETS["dummy"] and resolve_model("demo") == "demo"
    local = tmp_path / "test-org" / "demo"
    local.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert model_source("test-org/demo") == Path("test-org/demo")
    assert resolve_model("test-org/demo") == "test-org/demo"
    hf = pytest.importorskip("huggingface_hub")  # its own offline lookup finds the same files
    assert Path(hf.try_to_load_from_cache("test-org/demo", "config.json",
                                          cache_dir=cache)) == main / "config.json"


def test_missing_model_is_one_line_naming_the_cache(hub):
    cache = hub[0]
    with pytest.raises(ConfigError) as e:
        model_source("test-org/absent")
    msg = str(e.value)
    assert "\n" not in msg and str(cache / "models--test-org--absent" / "refs" / "main") in msg
    with pytest.raises(ConfigError, match="revision nope"):
        model_source("test-org/demo", "nope")


def test_generate_from_the_cache_equals_the_bundled_model(hub, capsys):
    argv = ["--prompt-ids", "1,50,60", "--max-new-tokens", "6", "--json"]
    assert generate.main(["--model", "demo", *argv]) == 0
    want = json.loads(capsys.readouterr().out)
    assert generate.main(["--model", "test-org/demo", *argv]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["token_ids"] == want["token_ids"] and len(got["token_ids"]) == 6


def test_clis_refuse_a_missing_model_with_one_line(hub, capsys, tmp_path):
    looked = str(hub[0] / "models--test-org--absent")
    for main, argv, prog in [
        (generate.main, ["--model", "test-org/absent", "--prompt-ids", "1"], "error:"),
        (serve_main, ["--model", "test-org/absent", "--revision", "v2"], "serve: error:"),
        (convert_main, ["--hf-dir", "test-org/absent", "--out", str(tmp_path / "o")],
         "checkpoints.convert: error:"),
    ]:
        assert main(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and prog in err[0] and looked in err[0], err
    assert resolve_hf_dir("test-org/demo") == hub[1]
