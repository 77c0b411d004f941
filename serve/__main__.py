"""`python -m serve [--model demo|DIR|dummy]`: start the engine cores; serve gRPC and the
OpenAI HTTP API until SIGTERM.

This process is the front (gRPC and HTTP on one asyncio loop, tokenization, chat templates,
detokenization, streaming; it imports no JAX);
each dp replica's engine core runs in a process of its own (`serve/engine_client.py`). Every
`EngineConfig` field is also a flag (`--page-size 16`, `--batch-buckets 8,32`,
`--unroll-layers`), derived from the dataclass itself, so engine options never need a second
list here; vLLM's names `--max-model-len`, `--max-num-seqs` and `--tensor-parallel-size` are
accepted beside ours. SIGTERM or SIGINT drains: health goes NOT_SERVING (HTTP `/health` 503),
new requests get UNAVAILABLE (HTTP 503), in-flight requests (HTTP streams too) finish, and the
process exits 0; a second signal exits at once with 1. An
engine core that dies ends every request it held with UNAVAILABLE and the server exits 1.
Errors before serving print one line `serve: error: ...` and exit 1.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
import types
import typing
from collections.abc import Sequence

from jaxinfer.config import DEFAULT_MODEL, QUANT_MODES, EngineConfig, ServeConfig, resolve_model
from jaxinfer.errors import ConfigError, JaxinferError
from jaxinfer.hf_cache import add_revision_arg
from sharding import multihost

logger = logging.getLogger("serve")

# Flags that are not EngineConfig fields or that the server owns.
_OWN = {"model", "host", "port", "mesh", "metrics_port", "tls_cert", "tls_key", "max_queue",
        "compile_cache", "max_message_bytes", "drain_timeout", "stream_timeout", "seed",
        "allow_pickle", "log_level", "coordinator", "num_processes", "process_id", "step_port",
        "dtype", "engine_in_process", "http_host", "http_port", "served_model_name", "chat_template",
        "quant", "max_model_len", "max_num_seqs", "tensor_parallel_size"}


def _engine_flag(p: argparse.ArgumentParser, field: dataclasses.Field, hint) -> None:
    flag = "--" + field.name.replace("_", "-")
    default = field.default if field.default is not dataclasses.MISSING else None
    help_ = f"EngineConfig.{field.name} (default {default!r})"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    optional = origin in (typing.Union, types.UnionType) and type(None) in args
    if optional:
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
    elif origin is typing.Literal:
        p.add_argument(flag, choices=[str(a) for a in args], default=None, help=help_)
    elif origin is tuple:
        item = args[0] if args else int
        p.add_argument(flag, type=_csv(item), default=None, metavar="A,B,...", help=help_)
    elif hint in (int, float, str):
        p.add_argument(flag, type=hint, default=None, help=help_)


def _csv(item):
    def parse(text: str):
        try:
            return tuple(item(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {item.__name__}s, "
                                             f"got {text!r}") from None
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serve",
                                description="Serve a Llama-family model over gRPC "
                                "(jaxinfer.v1, JetStream-compatible, health, reflection) and the "
                                "OpenAI HTTP API.")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="HF or converted directory, a Hugging Face id (ORG/NAME, from the local "
                   "cache; nothing is downloaded), a bundled model (demo: the default, trained "
                   "on the Python stdlib) or a random-weight preset (dummy, llama-3.2-1b-shape, "
                   "...)")
    add_revision_arg(p)
    p.add_argument("--host", default=ServeConfig.host, help="address to bind (default %(default)s)")
    p.add_argument("--port", type=int, default=ServeConfig.port,
                   help="port (default %(default)s; 0 picks a free one)")
    p.add_argument("--mesh", default=None,
                   help="dp=D,pp=P,tp=T (default dp=1,pp=1,tp=1): D engine-core processes "
                   "(replicas, each with its own weights, --num-pages and decode slots), each "
                   "over P x T devices")
    p.add_argument("--tensor-parallel-size", type=int, default=None, metavar="T",
                   help="vLLM's name for the mesh's tp (with --mesh, they must agree)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="vLLM's name for --max-seq-len")
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="vLLM's name for the decode slots: the largest of --batch-buckets")
    p.add_argument("--quant", choices=QUANT_MODES, default=None,
                   help="quantize the weights at load, as generate and bench do: int8 (per "
                   "channel), int8-g64/int8-g128 (group-wise), fp8 (W8A8), int4-g128 "
                   "(group-wise int4); default: as stored")
    p.add_argument("--http-host", default=None,
                   help="address of the OpenAI HTTP API (default: --host)")
    p.add_argument("--http-port", type=int, default=8000,
                   help="port of the OpenAI HTTP API (default %(default)s; 0 turns it off)")
    p.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="the model name(s) /v1/models lists and HTTP requests must use "
                   "(default: the --model value)")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="a jinja chat template replacing the model's own (chat_template.jinja "
                   "or tokenizer_config.json's chat_template)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="weights and activations (default bfloat16; float32 on CPU)")
    p.add_argument("--engine-in-process", action="store_true",
                   help="run the engine core on a thread of this process instead of its own "
                   "process (debugging; multi-host serving always does)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics over HTTP on this port (same host)")
    p.add_argument("--tls-cert", default=None, help="PEM certificate chain (with --tls-key)")
    p.add_argument("--tls-key", default=None, help="PEM private key (with --tls-cert)")
    p.add_argument("--max-queue", type=int, default=ServeConfig.max_queue,
                   help="waiting requests before RESOURCE_EXHAUSTED (default %(default)s)")
    p.add_argument("--max-message-bytes", type=int, default=ServeConfig.max_message_bytes)
    p.add_argument("--drain-timeout", type=float, default=ServeConfig.drain_timeout,
                   help="seconds SIGTERM waits for in-flight requests (default %(default)s)")
    p.add_argument("--stream-timeout", type=float, default=ServeConfig.stream_timeout,
                   help="seconds a streamed response may wait on a client that reads nothing "
                   "before it is cancelled and its KV pages freed (default %(default)s)")
    p.add_argument("--compile-cache", default=None,
                   help="JAX persistent compilation cache directory (fast restarts)")
    p.add_argument("--seed", type=int, default=0, help="weights seed of random presets")
    p.add_argument("--allow-pickle", action="store_true")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    multihost.add_distributed_args(p)
    p.add_argument("--step-port", type=int, default=None,
                   help="multi-host: port on the coordinator's host where process 0 sends the "
                   "device steps to the others (default: the coordinator's port + 1)")
    hints = typing.get_type_hints(EngineConfig)
    for field in dataclasses.fields(EngineConfig):
        if field.name not in _OWN and field.init:
            _engine_flag(p, field, hints[field.name])
    p.set_defaults(model_name=None)  # main() keeps --model as typed here
    return p


def engine_config(args: argparse.Namespace, *, default_dtype: str) -> EngineConfig:
    overrides = {}
    for field in dataclasses.fields(EngineConfig):
        value = getattr(args, field.name, None)
        if field.name not in _OWN and value is not None:
            overrides[field.name] = value
    overrides["dtype"] = args.dtype or default_dtype
    if args.max_model_len is not None:
        if overrides.get("max_seq_len", args.max_model_len) != args.max_model_len:
            raise ConfigError(f"--max-model-len {args.max_model_len} and --max-seq-len "
                              f"{overrides['max_seq_len']} disagree; give one")
        overrides["max_seq_len"] = args.max_model_len
    if args.max_num_seqs is not None:
        n = args.max_num_seqs
        if n < 1:
            raise ConfigError(f"--max-num-seqs must be >= 1, got {n}")
        given = overrides.get("batch_buckets")
        if given is not None and given[-1] != n:
            raise ConfigError(f"--max-num-seqs {n} and --batch-buckets {given} disagree (the "
                              "largest bucket is the number of sequences); give one")
        if given is None:  # the default buckets below n, then n itself
            overrides["batch_buckets"] = tuple(
                b for b in EngineConfig.batch_buckets if b < n) + (n,)
    return EngineConfig(**overrides)


def resolve_mesh(args: argparse.Namespace) -> str:
    """--mesh, with vLLM's --tensor-parallel-size folded in."""
    from sharding.mesh import parse_mesh

    mesh = args.mesh or "dp=1,pp=1,tp=1"
    tp_size = args.tensor_parallel_size
    if tp_size is None:
        return mesh
    if tp_size < 1:
        raise ConfigError(f"--tensor-parallel-size must be >= 1, got {tp_size}")
    spec = parse_mesh(mesh)
    if args.mesh is not None and spec.tp != tp_size:
        raise ConfigError(f"--tensor-parallel-size {tp_size} and --mesh {args.mesh} disagree")
    return f"dp={spec.dp},pp={spec.pp},tp={tp_size}"


def engine_fields(engine_cfg: EngineConfig) -> dict:
    """The config as JSON fields (for the engine-core processes)."""
    return {f.name: getattr(engine_cfg, f.name) for f in dataclasses.fields(EngineConfig)}


def _served_names(args: argparse.Namespace) -> list[str]:
    """--served-model-name, else --model as the user typed it (not its cache snapshot path)."""
    return args.served_model_name or [args.model_name or args.model]


def _http_settings(args: argparse.Namespace) -> dict | None:
    """What the HTTP front needs, checked before any engine starts (None: --http-port 0)."""
    if args.http_port == 0:
        return None
    if not 0 < args.http_port < 65536:
        raise ConfigError(f"--http-port must be in [0, 65535], got {args.http_port}")
    from jaxinfer.chat_template import chat_template_for_model

    return {"host": args.http_host or args.host, "port": args.http_port,
            "served_model_names": _served_names(args),
            "chat_template": chat_template_for_model(args.model, args.chat_template)}


async def _serve(server, shutdown: asyncio.Event, *, http: dict | None = None,
                 metrics=None) -> bool:
    from serve.server import State

    loop = asyncio.get_running_loop()
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        name = signal.Signals(signum).name
        if signals > 1:
            logger.warning("second %s: exiting now", name)
            _kill_cores(server)
            os._exit(1)
        if server.state is State.STARTING:
            # Nothing can be in flight before SERVING, and compiles cannot be interrupted:
            # leave now rather than finish a warm-up nobody will use.
            logger.info("%s during warm-up: exiting", name)
            _kill_cores(server)
            os._exit(0)
        logger.info("%s: draining (send it again to exit at once)", name)
        server.request_shutdown_state()
        shutdown.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    await server.start()
    front = None
    try:
        if http is not None:
            # FastAPI and uvicorn are imported only here: a gRPC-only server needs neither.
            from serve.http_server import HttpFront

            front = HttpFront(server, metrics=metrics, **http)
            try:
                await front.start()
            except BaseException:
                await server.stop()  # nothing is in flight yet; leave no gRPC threads behind
                front = None
                raise
        return await server.run(shutdown)
    finally:
        if front is not None:
            await front.stop()


def _kill_cores(server) -> None:
    kill = getattr(server.engine, "kill", None)
    if kill is not None:
        kill()


def build_engine(args: argparse.Namespace, engine_cfg: EngineConfig, *, max_queue: int,
                 metrics=None, on_fatal=None):
    """The engine client: one engine-core process per dp replica, each on pp x tp devices of
    its own (or, with --engine-in-process, cores on threads of this process)."""
    from jaxinfer.tokenizer import tokenizer_for_model
    from serve.engine_client import EngineClient
    from sharding.mesh import MeshSpec, parse_mesh

    spec = parse_mesh(resolve_mesh(args))
    replica = MeshSpec(pp=spec.pp, tp=spec.tp)
    tokenizer = tokenizer_for_model(args.model)
    if args.engine_in_process:
        import jax

        from jaxinfer.engine.core import EngineCore
        from jaxinfer.model_loader import load_model
        from sharding.mesh import make_mesh, replica_meshes

        cores = []
        for sub in replica_meshes(make_mesh(spec)):
            loaded = load_model(args.model, mesh=sub, dtype=engine_cfg.dtype, seed=args.seed,
                                allow_pickle=args.allow_pickle, quant=args.quant)
            cores.append(EngineCore.create(loaded, engine_cfg, mesh=sub))
        logger.info("engine cores on threads of this process (%s)", jax.default_backend())
        return EngineClient.in_process(cores, tokenizer=tokenizer, max_queue=max_queue,
                                       metrics=metrics, on_fatal=on_fatal, progress=True)
    core_spec = {"model": args.model, "engine": engine_fields(engine_cfg), "mesh": str(replica),
                 "seed": args.seed, "allow_pickle": args.allow_pickle, "quant": args.quant,
                 "compile_cache": args.compile_cache, "log_level": args.log_level}
    return EngineClient.spawn(core_spec, dp=spec.dp, devices_per_replica=replica.size,
                              tokenizer=tokenizer, max_queue=max_queue, metrics=metrics,
                              on_fatal=on_fatal)


def _multihost_engine(args, engine_cfg: EngineConfig, channel, *, max_queue: int, metrics,
                      on_fatal):
    """Process 0 of a multi-host server: its engine core on a thread (this process drives the
    devices), its runner sending every device call to the other processes."""
    import functools

    from jaxinfer.engine.core import EngineCore
    from jaxinfer.model_loader import load_model
    from serve.engine_client import EngineClient
    from serve.multihost import BroadcastingRunner
    from sharding.mesh import make_mesh

    mesh = make_mesh(args.mesh)
    loaded = load_model(args.model, mesh=mesh, dtype=engine_cfg.dtype, seed=args.seed,
                        allow_pickle=args.allow_pickle, quant=args.quant)
    core = EngineCore.create(loaded, engine_cfg, mesh=mesh,
                             runner_factory=functools.partial(BroadcastingRunner,
                                                              channel=channel))
    return EngineClient.in_process([core], tokenizer=loaded.tokenizer, max_queue=max_queue,
                                   metrics=metrics, on_fatal=on_fatal, progress=True)


def _follow(args: argparse.Namespace, engine_cfg: EngineConfig, address: tuple[str, int]) -> int:
    """A multi-host process other than 0: load the same model, replay process 0's steps."""
    import jax

    from jaxinfer.engine.core import resolve_engine_config
    from jaxinfer.model_loader import load_model
    from jaxinfer.runner import Runner
    from serve.multihost import connect, run_follower
    from sharding.mesh import make_mesh

    if args.compile_cache:
        jax.config.update("jax_compilation_cache_dir", os.fspath(args.compile_cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    mesh = make_mesh(args.mesh)
    loaded = load_model(args.model, mesh=mesh, dtype=engine_cfg.dtype, seed=args.seed,
                        allow_pickle=args.allow_pickle, quant=args.quant)
    eng = resolve_engine_config(loaded.cfg, engine_cfg, mesh)
    runner = Runner(loaded.cfg, eng, loaded.graphdef, loaded.params, mesh=mesh)
    sock = connect(address)
    logger.info("process %d: replaying the steps of process 0", jax.process_index())
    run_follower(runner, sock)
    logger.info("process %d: stopped", jax.process_index())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.log_level != "DEBUG":  # JAX's backend probing is noise at INFO
        logging.getLogger("jax").setLevel(logging.WARNING)
    metrics_http = None
    fatal: list[str] = []
    try:
        # An HF id becomes its snapshot directory here, once, for every process after this;
        # `model_name` keeps what the user typed (for names shown to clients).
        args.model_name = args.model
        args.model = resolve_model(args.model, args.revision)
        serve_cfg = ServeConfig(host=args.host, port=args.port, max_queue=args.max_queue,
                                metrics_port=args.metrics_port, tls_cert=args.tls_cert,
                                tls_key=args.tls_key, max_message_bytes=args.max_message_bytes,
                                drain_timeout=args.drain_timeout,
                                stream_timeout=args.stream_timeout)
        args.mesh = resolve_mesh(args)
        http = _http_settings(args)
        dist = multihost.config_from(args.coordinator, args.num_processes, args.process_id)
        from serve.metrics import MetricsHttpServer, PrometheusMetrics
        from serve.server import Server

        shutdown = asyncio.Event()
        loop_box: list[asyncio.AbstractEventLoop] = []

        def on_fatal(reason: str) -> None:  # a core died: every request it held has failed
            fatal.append(reason)
            if loop_box:
                loop_box[0].call_soon_threadsafe(shutdown.set)

        metrics = PrometheusMetrics(
            model_name=_served_names(args)[0])
        if dist.is_distributed:
            import jax  # this process drives devices: it must join before touching them

            multihost.initialize(dist)
            engine_cfg = engine_config(
                args, default_dtype="float32" if jax.default_backend() == "cpu" else "bfloat16")
            if jax.process_count() > 1:
                from serve.multihost import StepChannel, step_address

                if engine_cfg.speculative_config:
                    raise ConfigError("--speculative-config is not supported in multi-host "
                                      "serving (the followers replay plain steps only)")

                address = step_address(dist.coordinator, args.step_port)
                if jax.process_index() != 0:
                    return _follow(args, engine_cfg, address)
                channel = StepChannel(address, jax.process_count() - 1)
                engine = _multihost_engine(args, engine_cfg, channel,
                                           max_queue=serve_cfg.max_queue, metrics=metrics,
                                           on_fatal=on_fatal)
            else:
                engine = build_engine(args, engine_cfg, max_queue=serve_cfg.max_queue,
                                      metrics=metrics, on_fatal=on_fatal)
        else:
            engine_cfg = engine_config(args, default_dtype=_default_dtype())
            engine = build_engine(args, engine_cfg, max_queue=serve_cfg.max_queue,
                                  metrics=metrics, on_fatal=on_fatal)
        server = Server(engine, serve_cfg, metrics=metrics)
        if serve_cfg.metrics_port is not None:
            metrics_http = MetricsHttpServer(metrics, host=serve_cfg.host,
                                             port=serve_cfg.metrics_port)

        async def run() -> bool:
            loop_box.append(asyncio.get_running_loop())
            return await _serve(server, shutdown, http=http, metrics=metrics)

        clean = asyncio.run(run())
    except (JaxinferError, OSError) as e:
        print(f"serve: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the server took over the signal
        return 130
    finally:
        if metrics_http is not None:
            metrics_http.close()
    if fatal:
        logger.error("stopped: %s", fatal[0])
        return 1
    logger.info("stopped (%s)", "drained" if clean else "drain cut short")
    return 0


def _default_dtype() -> str:
    """float32 on CPU, bfloat16 on GPU, decided without importing JAX here (the cores do):
    JAX_PLATFORMS when set, else whether an NVIDIA device node exists."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return "float32" if platforms.split(",")[0].strip() == "cpu" else "bfloat16"
    return "bfloat16" if os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl") \
        else "float32"


if __name__ == "__main__":
    sys.exit(main())
