"""`python -m serve.client`: a command-line client of `jaxinfer.v1.Generation`.

    python -m serve.client --prompt "Once upon a time" --stream --max-tokens 32
    python -m serve.client --prompt-ids 1,2,3 --json
    python -m serve.client --info

With `--stream` text is printed as it arrives (token ids when the model has no tokenizer, or
with `--ids`); without it the unary call prints each completion when done. `--json` prints one
JSON object per response message instead. With n > 1 each piece is prefixed by its sample index.
Errors print one line `serve.client: error: CODE: details` and exit 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import grpc
from google.protobuf.json_format import MessageToDict

from serve.protos import jaxinfer_v1_pb2 as pb
from serve.protos import jaxinfer_v1_pb2_grpc as pb_grpc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serve.client",
                                description="Send a generation request to `python -m serve`.")
    p.add_argument("--target", default="127.0.0.1:50051", help="host:port (default %(default)s)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text (tokenized by the server)")
    src.add_argument("--prompt-ids", help="comma-separated token ids, used exactly")
    src.add_argument("--info", action="store_true", help="print ServerInfo as JSON and exit")
    p.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--n", type=int, default=1)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--logprobs", type=int, default=None)
    p.add_argument("--priority", type=int, default=0)
    p.add_argument("--ids", action="store_true", help="print token ids, not text")
    p.add_argument("--json", action="store_true", help="print response messages as JSON")
    p.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    p.add_argument("--tls-ca", default=None,
                   help="PEM root certificate: connect with TLS and trust this CA")
    return p


def build_request(args: argparse.Namespace) -> pb.GenerateRequest:
    s = pb.SamplingParams(temperature=args.temperature, top_k=args.top_k, min_p=args.min_p,
                          n=args.n, stop=args.stop, ignore_eos=args.ignore_eos)
    for name in ("max_tokens", "top_p", "seed", "logprobs"):
        if getattr(args, name) is not None:
            setattr(s, name, getattr(args, name))
    req = pb.GenerateRequest(sampling=s, priority=args.priority)
    if args.prompt_ids is not None:
        try:
            ids = [int(x) for x in args.prompt_ids.split(",") if x.strip()]
        except ValueError:
            raise SystemExit(f"serve.client: error: --prompt-ids must be comma-separated "
                             f"integers, got {args.prompt_ids!r}") from None
        req.token_ids.ids.extend(ids)
    else:
        req.text = args.prompt if args.prompt is not None else "Once upon a time"
    return req


def _channel(args: argparse.Namespace) -> grpc.Channel:
    if args.tls_ca:
        with open(args.tls_ca, "rb") as f:
            creds = grpc.ssl_channel_credentials(root_certificates=f.read())
        return grpc.secure_channel(args.target, creds)
    return grpc.insecure_channel(args.target)


def _piece(msg, *, ids: bool, n: int) -> str:
    body = " ".join(map(str, msg.token_ids)) + (" " if msg.token_ids else "") if ids else msg.text
    return f"[{msg.index}] {body}\n" if n > 1 and body else body


def run(args: argparse.Namespace, out=sys.stdout) -> None:
    with _channel(args) as channel:
        stub = pb_grpc.GenerationStub(channel)
        if args.info:
            info = stub.ServerInfo(pb.ServerInfoRequest(), timeout=args.timeout)
            out.write(json.dumps(MessageToDict(info), indent=2) + "\n")
            return
        req = build_request(args)
        if not args.ids and not args.json:  # a model without a tokenizer answers ids only
            info = stub.ServerInfo(pb.ServerInfoRequest(), timeout=args.timeout)
            args.ids = not info.model.has_tokenizer
        if args.stream:
            for msg in stub.Generate(req, timeout=args.timeout):
                if args.json:
                    out.write(json.dumps(MessageToDict(msg)) + "\n")
                else:
                    out.write(_piece(msg, ids=args.ids, n=args.n))
                out.flush()
            if not args.json and args.n == 1:
                out.write("\n")
            return
        resp = stub.GenerateUnary(req, timeout=args.timeout)
        if args.json:
            out.write(json.dumps(MessageToDict(resp)) + "\n")
            return
        for c in resp.completions:
            prefix = f"[{c.index}] " if args.n > 1 else ""
            body = " ".join(map(str, c.token_ids)) if args.ids else c.text
            out.write(prefix + body + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except grpc.RpcError as e:
        print(f"serve.client: error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"serve.client: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
