"""Tensor, pipeline and data parallel generation on 8 fake CPU devices.

The models are the HF-parity test models (random-weight transformers checkpoints, float32)
with 8 query heads, 2 (Llama) or 1 (Qwen2, MQA) KV heads and 4 layers, so every mesh of the
issue fits: tp=8 replicates the KV heads, pp=4 puts one layer per stage. Greedy tokens on each
mesh must equal the one-device tokens exactly; parameter and cache PartitionSpecs and the
collectives in the compiled decode and prefill programs are asserted. dp replicas are separate
engine cores (`LLM.load`: one per replica), each on its own pp x tp slice of the mesh.

Budget: one LLM per mesh, one prefill shape and one decode batch bucket: three programs per
core (prefill, decode beside prefill, multi-step decode).
"""

from __future__ import annotations

import dataclasses
import re

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jax.sharding import PartitionSpec as P  # noqa: E402

from jaxinfer import generate  # noqa: E402
from jaxinfer.config import EngineConfig  # noqa: E402
from jaxinfer.engine.core import EngineCore  # noqa: E402
from jaxinfer.engine.llm import LLM  # noqa: E402
from jaxinfer.model_loader import LoadedModel, load_model  # noqa: E402
from sharding import pipeline  # noqa: E402
from sharding.mesh import MeshSpec, make_mesh, parse_mesh  # noqa: E402
from tests.jaxinfer.test_hf_parity import COMMON, PROMPTS  # noqa: E402

NEW_TOKENS = 7  # 1 from prefill + 6 decoded, mostly in dispatches of 4 steps
# tp=2 splits the KV heads, tp=8 replicates them (tp > KV heads)
MESHES = ["tp=2", "tp=8", "pp=2", pytest.param("pp=4", marks=pytest.mark.slow), "dp=2,tp=2",
          "pp=2,tp=2"]
MODELS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "qwen2_mqa_bias": ("Qwen2Config", "Qwen2ForCausalLM",
                       dict(num_key_value_heads=1, tie_word_embeddings=True, head_dim=8)),
    # the Pallas decode kernel needs a power-of-two head dim >= 16
    "llama_hd16": ("LlamaConfig", "LlamaForCausalLM",
                   dict(num_key_value_heads=2, tie_word_embeddings=True, head_dim=16)),
}


def save_hf_model(kind: str, path) -> None:
    """A random-weight HF checkpoint: the parity models' sizes with 8 heads and 4 layers."""
    cfg_cls, model_cls, extra = MODELS[kind]
    cfg = getattr(transformers, cfg_cls)(**{**COMMON, "num_attention_heads": 8,
                                            "num_hidden_layers": 4, **extra})
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(cfg).eval()
    if kind == "qwen2_mqa_bias":  # HF zero-inits biases; make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj,
                             layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.2)
    model.save_pretrained(path, safe_serialization=True)


def make_generator(model_dir, mesh_text: str, *, devices=None, unroll_layers=None,
                   kernels="reference") -> LLM:
    """An LLM on `mesh_text` (one engine core per dp replica) with one decode batch bucket
    and one prefill shape."""
    mesh = make_mesh(parse_mesh(mesh_text), devices=devices)
    engine = EngineConfig(
        page_size=4, num_pages=64, max_seq_len=64, dtype="float32", prefill_buckets=(8,),
        prefill_rows=(4,), batch_buckets=(4,), max_num_batched_tokens=32, decode_steps=4,
        unroll_layers=unroll_layers, kernels=kernels)
    return LLM.load(str(model_dir), engine, mesh=mesh, dtype="float32")


def greedy(llm: LLM) -> list[list[int]]:
    out = llm.generate([llm.request(p, max_tokens=NEW_TOKENS) for p in PROMPTS])
    return [c.token_ids for [c] in out]


def with_eos(llm: LLM, eos: int) -> LLM:
    """The same weights and engine config with `eos` as the model's EOS id (new cores)."""
    cores = []
    for core in llm.cores:
        r = core.runner
        loaded = LoadedModel(cfg=dataclasses.replace(r.model_cfg, eos_token_ids=(eos,)),
                             graphdef=r.graphdef, params=r.params, tokenizer=llm.tokenizer,
                             source=core.model_name, quant=core.quant)
        cores.append(EngineCore.create(loaded, core.engine_cfg, mesh=r.mesh))
    return LLM(cores, llm.tokenizer)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{kind: (hf_dir, one-device greedy tokens)}."""
    out = {}
    for kind in ("llama", "qwen2_mqa_bias"):
        path = tmp_path_factory.mktemp(kind) / "hf"
        save_hf_model(kind, path)
        out[kind] = (path, greedy(make_generator(path, "dp=1", devices=jax.devices()[:1])))
    return out


@pytest.fixture(scope="module")
def pallas_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama_hd16") / "hf"
    save_hf_model("llama_hd16", path)
    return path


def expected_specs(mesh_text: str, kv_heads: int) -> dict[str, P]:
    tp = parse_mesh(mesh_text).tp
    kv = "tp" if kv_heads % tp == 0 else None  # replicated when tp > KV heads
    return {
        "layers/wq": P("pp", None, "tp", None), "layers/wk": P("pp", None, kv, None),
        "layers/wv": P("pp", None, kv, None), "layers/wo": P("pp", "tp", None, None),
        "layers/w_gate": P("pp", None, "tp"), "layers/w_up": P("pp", None, "tp"),
        "layers/w_down": P("pp", "tp", None), "layers/attn_norm": P("pp", None),
        "embed": P("tp", None), "final_norm": P(None),
        # dp never appears inside an engine: each replica holds a whole pool of its own
        "cache": P("pp", kv, None, None, None),
    }


@pytest.mark.parametrize("mesh_text", MESHES)
def test_llama_tokens_and_shardings(models, mesh_text):
    path, want = models["llama"]
    llm = make_generator(path, mesh_text)
    assert greedy(llm) == want
    assert llm.pages_used() == 0
    m = parse_mesh(mesh_text)
    # dp replicas are separate engine cores on disjoint pp x tp slices of the mesh
    assert len(llm.cores) == m.dp
    device_sets = [{d.id for d in c.runner.mesh.devices.flat} for c in llm.cores]
    assert all(len(s) == m.pp * m.tp for s in device_sets)
    assert len(set().union(*device_sets)) == m.size
    specs = expected_specs(mesh_text, kv_heads=2)
    for core in llm.cores:
        params = core.runner.params
        assert MeshSpec.of(core.runner.mesh) == MeshSpec(pp=m.pp, tp=m.tp)
        for name, spec in specs.items():
            if name == "cache":
                got = core.runner.cache.k.sharding.spec
            else:
                node = params
                for key in name.split("/"):
                    node = node[key]
                got = node.sharding.spec
            assert got == spec, (name, got, spec)
        assert params["lm_head"].sharding.spec == P(None, "tp")  # untied head: vocab over tp
        # Sharded means sharded: each device holds 1/tp of a column-parallel weight, 1/pp of
        # the layers.
        wq = params["layers"]["wq"]
        assert wq.addressable_shards[0].data.size == wq.size // (m.tp * m.pp)
        assert {d.id for d in wq.sharding.device_set} == {
            d.id for d in core.runner.mesh.devices.flat}


def test_eos_stops_rows_inside_the_pipeline(models):
    """Rows stop on device at different steps (EOS mid-chunk) inside the pipelined decode and
    on dp replicas, exactly as on one device."""
    path, want = models["llama"]
    eos = want[0][2]  # prompt 0 stops after its 3rd token; the others when they meet it
    one = greedy(with_eos(make_generator(path, "dp=1", devices=jax.devices()[:1]), eos))
    assert len(one[0]) == 3 and one[0][-1] == eos
    assert greedy(with_eos(make_generator(path, "dp=2,pp=2,tp=2"), eos)) == one


@pytest.mark.parametrize("mesh_text", ["tp=2", pytest.param("pp=2,tp=2", marks=pytest.mark.slow)])
def test_pallas_kernels_on_meshes(pallas_model, mesh_text, monkeypatch):
    """--kernels pallas on meshes: the attention kernels run (interpret mode here) per tp shard
    under tensor parallelism and on the local blocks under dp/pp, and the tokens stay exact."""
    from pallas_kernels import flash_attention, paged_decode_attention
    path = pallas_model
    want = greedy(make_generator(path, "dp=1", devices=jax.devices()[:1]))
    traced = []
    for module, name in ((paged_decode_attention, "paged_decode_attention"),
                         (flash_attention, "flash_prefill_attention")):
        def spy(q, k_pages, *args, _kernel=getattr(module, name), _name=name, **kw):
            traced.append((_name, q.shape[2], k_pages.shape[1]))  # heads seen by the kernel
            return _kernel(q, k_pages, *args, **kw)
        monkeypatch.setattr(module, name, spy)
    from pallas_kernels import qmatmul
    dense = []
    real_dense = qmatmul.dense_matmul

    def dense_spy(x, w, **kw):
        dense.append(w.shape)
        return real_dense(x, w, **kw)

    monkeypatch.setattr(qmatmul, "dense_matmul", dense_spy)
    llm = make_generator(path, mesh_text, kernels="pallas")
    assert greedy(llm) == want
    # every program compiled (prefill 4 x 8 tokens, decode 1 and 4 steps, on each dp
    # replica's core) reads the 7 projection stacks in place
    programs = [key for core in llm.cores for key in core.runner.compiled]
    assert sorted({k[0] for k in programs}) == ["decode", "prefill"]
    assert len(dense) == 7 * len(programs) and all(len(shape) == 3 for shape in dense), dense
    tp = parse_mesh(mesh_text).tp
    # 8 query heads and 2 KV heads, split over tp: each kernel call sees its shard's heads
    # (prefill chunks of 8 tokens go to the decode kernel; tests/sharding/test_kernels_over_tp
    # covers the flash prefill kernel and quantized caches)
    assert {n for n, _, _ in traced} == {"paged_decode_attention"}
    assert {(qh, kh) for _, qh, kh in traced} == {(8 // tp, 2 // tp)}, traced


@pytest.mark.parametrize("mesh_text", ["tp=8", pytest.param("pp=2,tp=2", marks=pytest.mark.slow)])
def test_qwen2_bias_mqa_tokens(models, mesh_text):
    path, want = models["qwen2_mqa_bias"]
    llm = make_generator(path, mesh_text)
    assert greedy(llm) == want
    for core in llm.cores:
        params = core.runner.params
        assert params["layers"]["bq"].sharding.spec == P("pp", "tp", None)
        assert params["layers"]["bk"].sharding.spec == P("pp", None, None)  # K=1


_COLLECTIVE = re.compile(r"= (\([^=]*?\)|\S+) (all-reduce|all-gather|collective-permute|"
                         r"all-to-all|reduce-scatter)\(.*?op_name=\"([^\"]*)\"")
_PARTITIONS = re.compile(r"\bnum_partitions=(\d+)")
# the step program's own loop (the decode steps, or the pipeline ticks): its trip count
_STEP_LOOP = re.compile(r' while\(.*?op_name="jit\(step_\w+\)(?:/shard_map)?/while".*?'
                        r'"known_trip_count":\{"n":"(\d+)"\}')


def collectives(hlo: str) -> list[tuple[str, str, str]]:
    """(op, result type, op_name) of every collective instruction with metadata."""
    return [(m.group(2), m.group(1), m.group(3)) for m in _COLLECTIVE.finditer(hlo)]


def _elements(type_text: str) -> int:
    dims = re.search(r"\[([\d,]*)\]", type_text).group(1)
    return int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1


def _program(llm: LLM, kind: str, **want) -> tuple[tuple, str]:
    """(key, HLO text) of the one compiled program of the first core of `kind` whose key
    fields match `want` (decode: steps, full)."""
    fields = {"decode": ("b", "w", "steps", "full"), "prefill": ("r", "t")}[kind]
    found = [(key, exe.as_text()) for key, exe in llm.core.runner.compiled.items()
             if key[0] == kind and all(dict(zip(fields, key[1:]))[f] == v
                                       for f, v in want.items())]
    assert len(found) == 1, sorted(llm.core.runner.compiled)
    return found[0]


@pytest.mark.parametrize("mesh_text", ["tp=2", pytest.param("tp=8", marks=pytest.mark.slow),
                                       "pp=2,tp=2"])
def test_decode_hlo_collectives(models, mesh_text):
    """Megatron TP in the compiled multi-step decode program (one `lax.scan` over the steps,
    kept as one while loop, so its body is one decode step: every collective is in it): per
    layer exactly one all-reduce after attention (o) and one after the MLP (down), both on dot
    outputs; nothing else reduced but the vocab-parallel embedding lookup's [B, 1, D] rows and
    greedy sampling's [B] max and index; nothing at all all-gathered. Under pp the body is one
    pipeline tick: two ppermutes per stage hand-off (activations + int metadata) and one
    all-reduce broadcasting the last stage's [mb, 1, D] output to every stage (which all sample
    from it). A dp replica's program spans only its own pp x tp devices: no dp collectives."""
    path, _ = models["llama"]
    llm = make_generator(path, mesh_text, unroll_layers=64)  # fully unrolled: countable
    greedy(llm)
    m = parse_mesh(mesh_text)
    b, steps = 4, llm.core.engine_cfg.decode_steps
    key, hlo = _program(llm, "decode", steps=steps, full=False)
    assert key[1] == b and steps > 1
    assert _PARTITIONS.findall(hlo) == [str(m.pp * m.tp)]
    # the scan over steps (pp: over pipeline ticks) stays one loop with one body
    m_count = pipeline.num_microbatches(b, m.pp)
    ticks = steps if m.pp == 1 else (steps - 1) * max(m_count, m.pp) + m_count + m.pp - 1
    assert _STEP_LOOP.findall(hlo) == [str(ticks)]
    ops = collectives(hlo)
    assert ops and all("/while/body/" in o[2] for o in ops), ops
    layers_here = 4 // m.pp
    dot_reduces = [o for o in ops if o[0] == "all-reduce" and o[2].endswith("dot_general")]
    assert len(dot_reduces) == 2 * layers_here, ops
    others = [o for o in ops if o[0] == "all-reduce" and not o[2].endswith("dot_general")]
    # the vocab-parallel lookup: one [B, 1, D] sum of the shards' rows, never the table
    embedding = [o for o in others if "vocab_parallel_embedding" in o[2]]
    # pp: each tick, the last stage's output to every stage (a masked psum)
    broadcast = [o for o in others if o[2].endswith("/psum") and o not in embedding]
    # greedy sampling over vocab-split logits: a max and a min-index all-reduce of [B] only
    greedy_ops = [o for o in others if o[2].endswith(("reduce_max", "reduce_min"))]
    assert len(embedding) == 1 and len(broadcast) == (1 if m.pp > 1 else 0), others
    hidden = llm.core.model_cfg.hidden_size
    rows = _elements(embedding[0][1]) // hidden  # the batch, or a pp micro-batch of it
    assert rows * hidden == _elements(embedding[0][1]) and b % rows == 0, embedding
    assert len(greedy_ops) == 2 and all(_elements(t) <= b for _, t, _ in greedy_ops), greedy_ops
    assert len(others) == len(embedding) + len(broadcast) + len(greedy_ops), others
    assert all(t.startswith("f32") and _elements(t) == rows * hidden for _, t, _ in broadcast)
    assert not [o for o in ops if o[0] == "all-gather"], ops
    permutes = [o for o in ops if o[0] == "collective-permute"]
    assert len(permutes) == (2 if m.pp > 1 else 0), permutes
    assert not [o for o in ops if o[0] in ("all-to-all", "reduce-scatter")]

    # Prefill (GPipe under pp): the same per-layer reductions, one activation ppermute, and
    # only the [R, V] logits gathered (the sampler works on whole rows).
    (_, r, _), hlo = _program(llm, "prefill")
    assert _PARTITIONS.findall(hlo) == [str(m.pp * m.tp)]
    ops = collectives(hlo)
    assert len([o for o in ops if o[2].endswith("dot_general")]) == 2 * layers_here, ops
    assert len([o for o in ops if o[0] == "collective-permute"]) == (1 if m.pp > 1 else 0)
    vocab = llm.core.model_cfg.vocab_size
    assert all(_elements(o[1]) <= max(r * m.tp, r * vocab) for o in ops if o[0] == "all-gather")
    assert not [o for o in ops if o[0] in ("all-to-all", "reduce-scatter")]


def test_pallas_decode_hlo_moves_no_weights(pallas_model):
    """--kernels pallas under tp=2: the kernels' shard_maps take the weights and cache as they
    are sharded, so the compiled decode step moves nothing big: one all-reduce per row-parallel
    matmul (2 per layer), the embedding's and greedy sampling's small ones, no all-gather,
    all-to-all or permute (a spec that disagreed with a weight's sharding would reshard it
    every step). The multi-step program's loop body is one step, so the counts are per step."""
    llm = make_generator(pallas_model, "tp=2", unroll_layers=64, kernels="pallas")
    greedy(llm)
    steps = llm.core.engine_cfg.decode_steps
    _, hlo = _program(llm, "decode", steps=steps, full=False)
    assert _STEP_LOOP.findall(hlo) == [str(steps)]
    ops = collectives(hlo)
    assert ops and all("/while/body/" in o[2] for o in ops), ops
    assert not [o for o in ops if o[0] != "all-reduce"], ops
    b, d = 4, 64
    big = [o for o in ops if _elements(o[1]) > b * d]
    assert not big, big
    assert len([o for o in ops if _elements(o[1]) == b * d]) == 2 * 4 + 1, ops  # + embedding


_SORT = re.compile(r"= \((\w+)\[([\d,]+)\]\S* [^)]*\) sort\(")


def test_serving_samplers_run_on_whole_rows(models):
    """The full sampler under tp (the prefill program, and the decode program for batches with
    sampling, penalties or logprobs) gathers the LM head's vocab-split logits once and sorts
    whole rows. Left to GSPMD, a prefill program split the sort's rows over tp with an
    all-to-all and kept the slot state's [S+1, V] penalty tables split over the vocab; on two
    H200s that step took 1.08 s instead of 9 ms."""
    path, _ = models["llama"]
    mesh = make_mesh(parse_mesh("tp=2"))
    loaded = load_model(str(path), mesh=mesh, dtype="float32")
    engine = EngineConfig(page_size=4, num_pages=64, max_seq_len=64, dtype="float32",
                          batch_buckets=(4,), prefill_buckets=(8,), prefill_rows=(1, 4),
                          max_num_batched_tokens=32, decode_steps=4)
    runner = LLM.from_loaded(loaded, engine, mesh=mesh).core.runner
    vocab = loaded.cfg.vocab_size
    keys = [("prefill", 4, 8), ("decode", 4, runner.full_width, 4, True)]
    assert set(keys) <= set(runner.program_keys())
    for key in keys:
        hlo = runner.compile(key).as_text()
        rows = key[1]
        sorts = [(dtype, tuple(int(d) for d in dims.split(","))) for dtype, dims in _SORT.findall(hlo)]
        assert sorts and all(dims == (rows, vocab) for _, dims in sorts), (key, sorts)
        ops = collectives(hlo)
        assert not [o for o in ops if o[0] in ("all-to-all", "reduce-scatter")], (key, ops)
        # the only gather is of the [rows, V] logits, never of [S+1, V] slot state
        assert all(_elements(t) <= rows * vocab for op, t, _ in ops if op == "all-gather"), ops


def _run_cli(capsys, argv):
    code = generate.main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("mesh,message", [
    ("tp=3", "mesh dp=1,pp=1,tp=3: tp=3 does not divide num_heads=4"),
    ("pp=4", "mesh dp=1,pp=4,tp=1: pp=4 does not divide num_layers=2"),
    ("dp=4,tp=4", "mesh dp=4,pp=1,tp=4 needs 16 devices but only 8 are available"),
    ("tp=2,zz=2", "bad mesh item 'zz=2': expected dp=N, pp=N or tp=N"),
])
def test_cli_bad_mesh_one_line(capsys, mesh, message):
    code, err = _run_cli(capsys, ["--model", "dummy", "--prompt-ids", "1,2", "--mesh", mesh])
    assert code == 1 and err == f"jaxinfer.generate: error: {message}"


def test_cli_bad_distributed_flags(capsys):
    code, err = _run_cli(capsys, ["--model", "dummy", "--coordinator", "127.0.0.1:1234"])
    assert code == 1 and "\n" not in err and "needs all of --coordinator" in err
    code, err = _run_cli(capsys, ["--model", "dummy", "--coordinator", "nohost", "--num-processes",
                                  "2", "--process-id", "0"])
    assert code == 1 and err.endswith("--coordinator must be host:port, got 'nohost'")
    code, err = _run_cli(capsys, ["--model", "dummy", "--coordinator", "127.0.0.1:1234",
                                  "--num-processes", "2", "--process-id", "2"])
    assert code == 1 and err.endswith("--process-id must be in [0, 2), got 2")


@pytest.mark.slow  # dp engines: test_llama_tokens_and_shardings[dp=2,tp=2] in the gate
def test_cli_dp_generates_like_one_device(capsys):
    """The CLI sizes pages and buckets for dp (3 prompts on dp=2: slots 0, 2 on replica 0)."""
    argv = ["--model", "dummy", "--prompt-ids", "256,72,105", "--prompt-ids", "256,9",
            "--prompt-ids", "5,6,7", "--max-new-tokens", "3", "--json", "--seed", "3",
            "--max-seq-len", "16"]
    assert generate.main(argv + ["--mesh", "dp=1"]) == 0
    one = capsys.readouterr().out
    assert generate.main(argv + ["--mesh", "dp=2,tp=2"]) == 0
    assert capsys.readouterr().out == one and len(one.splitlines()) == 3
