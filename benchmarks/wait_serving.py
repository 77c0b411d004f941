"""Wait until a `python -m serve` answers ServerInfo with serving=true; print one JSON line with
the seconds from `--since` (the server's launch, a Unix time) to SERVING.

    python benchmarks/wait_serving.py 127.0.0.1:50051 --since "$(date +%s.%N)" --label cold

Used by benchmarks/gpu_campaign.sh for the cold/warm start targets (issue 4). Exit 1 with a
one-line reason when the server is not serving within --timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import jax

from jaxinfer.run_info import git_sha
from serve.loadgen import ServerError, connect


async def _wait(target: str, timeout_s: float):
    channel, _, summary = await connect(target, timeout_s, None)
    await channel.close()
    return summary


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("target")
    p.add_argument("--since", type=float, required=True, help="launch time (Unix seconds)")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--label", default="start")
    args = p.parse_args()
    try:
        s = asyncio.run(_wait(args.target, args.timeout))
    except ServerError as e:
        print(f"wait_serving: {e}", file=sys.stderr)
        return 1
    print(json.dumps(dict(name="serving_start", start=args.label,
                          seconds_to_serving=round(time.time() - args.since, 2),
                          model=s.model, dtype=s.dtype, device=s.device, mesh=s.mesh,
                          jax_version=jax.__version__, git_sha=git_sha())), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
