"""Regenerate the committed Python modules of `serve/protos/*.proto` with grpc_tools.protoc.

    python serve/protos/generate.py            # rewrite *_pb2.py / *_pb2_grpc.py here
    python serve/protos/generate.py --check    # exit 1 if the committed modules are stale
    python serve/protos/generate.py --out DIR  # write them to DIR instead

protoc writes `import jaxinfer_v1_pb2 as ...` into the gRPC modules, which only works with this
folder on sys.path; the imports are rewritten package-relative (`from . import ...`) so the
modules load as `serve.protos.*`. The generated code pins the grpcio and protobuf versions it
was made with (it checks them at import), so pyproject.toml's lower bounds follow grpcio-tools.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTOS = ("jaxinfer_v1.proto", "jetstream.proto")


def generated_names(proto: str) -> tuple[str, str]:
    stem = proto.removesuffix(".proto")
    return f"{stem}_pb2.py", f"{stem}_pb2_grpc.py"


def _fix_imports(text: str) -> str:
    stems = "|".join(re.escape(p.removesuffix(".proto")) for p in PROTOS)
    return re.sub(rf"^import ({stems})_pb2 as ", r"from . import \1_pb2 as ", text,
                  flags=re.MULTILINE)


def generate(out_dir: Path) -> list[Path]:
    """Run protoc on every proto into `out_dir`; returns the files written."""
    from grpc_tools import protoc  # a build-time tool: only needed to regenerate

    include = Path(protoc.__file__).resolve().parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    for proto in PROTOS:
        args = ["grpc_tools.protoc", f"-I{HERE}", f"-I{include}", f"--python_out={out_dir}",
                f"--grpc_python_out={out_dir}", str(HERE / proto)]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")
    written = []
    for proto in PROTOS:
        for name in generated_names(proto):
            path = out_dir / name
            path.write_text(_fix_imports(path.read_text()))
            written.append(path)
    return written


def stale_files() -> list[str]:
    """Names of committed generated modules that differ from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        stale = []
        for fresh in generate(Path(tmp)):
            committed = HERE / fresh.name
            if not committed.is_file() or committed.read_text() != fresh.read_text():
                stale.append(fresh.name)
        return stale


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python serve/protos/generate.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="only check the committed modules")
    p.add_argument("--out", type=Path, default=HERE, help="output folder (default: here)")
    args = p.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print(f"generate.py: stale: {', '.join(stale)}; run python serve/protos/generate.py",
                  file=sys.stderr)
            return 1
        return 0
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
