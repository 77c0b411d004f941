#!/usr/bin/env bash
# One GPU measurement campaign per call of the device tool (METHOD.md: few, full calls).
#
#   bash benchmarks/gpu_campaign.sh kernels   # gpu_tests + kernel_bench
#   bash benchmarks/gpu_campaign.sh gpu_tests      # pytest -m gpu (serving tests need grpc health)
#   bash benchmarks/gpu_campaign.sh kernel_bench   # qmatmul bench, generate with pallas/quant
#   bash benchmarks/gpu_campaign.sh engine    # issue 13: offline, host probe, serving, sweep
#   bash benchmarks/gpu_campaign.sh offline   # jaxinfer.bench batch 1/32/64 (the served programs)
#   bash benchmarks/gpu_campaign.sh host      # host time per engine step at 64 sequences
#   bash benchmarks/gpu_campaign.sh serving   # cold/warm start, saturation, 50%/90% load
#   bash benchmarks/gpu_campaign.sh decode_steps_sweep   # served throughput/latency vs DS_SWEEP
#   bash benchmarks/gpu_campaign.sh train_models   # the demo, draft and target models
#   bash benchmarks/gpu_campaign.sh spec_pair       # speculative decoding on the trained pair
#   bash benchmarks/gpu_campaign.sh spec_synthetic  # speed vs acceptance (1B shape), n-gram on demo
#   MODEL=... bash benchmarks/gpu_campaign.sh spec_curve  # speed vs acceptance, k, adaptive
#   bash benchmarks/gpu_campaign.sh spec_repeat     # n-gram on prompts that the answer quotes
#   bash benchmarks/gpu_campaign.sh e2e       # jaxinfer.bench bf16, int8, fp8, int4 at b 1/32/64
#   bash benchmarks/gpu_campaign.sh quant_probe   # each quant kernel's plan variants per projection
#   bash benchmarks/gpu_campaign.sh soak      # python -m serve.soak on the demo model (issue 20)
#   bash benchmarks/gpu_campaign.sh mesh      # mesh sweep of the 8B shape (a 2-GPU machine)
#   bash benchmarks/gpu_campaign.sh serving_dp   # served throughput, dp=1 vs dp=2 (2 GPUs)
#   bash benchmarks/gpu_campaign.sh serving_multihost   # tp=2: one process vs two (2 GPUs)
#   bash benchmarks/gpu_campaign.sh mesh_70b        # 70B shape, MESHES_70B (default tp=2)
#   bash benchmarks/gpu_campaign.sh trace     # decode_trace_probe over TRACE_MESHES (2 GPUs)
#   bash benchmarks/gpu_campaign.sh qmatmul_rerun   # qmatmul GPU tests + fp8 rows at M=4096/8192
#
# Writes JSON lines and logs under $OUT (default ./gpu_out); each step has its own time limit so
# one hang cannot eat the call. The results we keep are copied into benchmarks/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export JAXINFER_GIT_SHA=${JAXINFER_GIT_SHA:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
PY=${PY:-python3}
MODEL=${MODEL:-llama-3.2-1b-shape}
scrape() { $PY -c "import sys, urllib.request as u; sys.stdout.write(u.urlopen('http://127.0.0.1:$1/metrics').read().decode())"; }
step() { echo "== $(date +%T) $*" | tee -a "$OUT/campaign.log"; }

kernels() { gpu_tests; kernel_bench; }

gpu_tests() {
  step "gpu tests"
  JAX_PLATFORMS=cuda timeout 300 $PY -m pytest -m gpu -q -p no:cacheprovider -rsxf tests 2>&1 \
    | tail -25 >"$OUT/gpu_tests.log"
}

kernel_bench() {
  step "qmatmul bench"
  timeout 150 $PY -m jaxinfer.bench kernels --ops qmatmul >"$OUT/qmatmul.jsonl" 2>>"$OUT/bench.err"
  step "generate bench"
  for cfg in "--kernels reference" "--kernels pallas" "--kernels pallas --quant int8" \
             "--kernels pallas --quant fp8"; do
    timeout 120 $PY -m jaxinfer.bench --model "$MODEL" $cfg --batch 1,64 --prompt-len 128 \
      --gen-len 256 --decode-steps 16 --repeat 2 >>"$OUT/generate.jsonl" 2>>"$OUT/bench.err"
  done
}

engine() { offline; host; serving; decode_steps_sweep; }

offline() {  # the bench drives the engine the server runs; batch 64 with prefill is the anchor
  step "offline bench $MODEL"
  timeout 200 $PY -m jaxinfer.bench --model "$MODEL" --batch ${OFFLINE_BATCH:-1,32,64} \
    --prompt-len 128 --gen-len 256 --decode-steps ${DS:-4} --repeat 2 \
    >>"$OUT/engine.jsonl" 2>>"$OUT/bench.err"
}

host() {
  step "host time per engine step"
  timeout 150 $PY benchmarks/engine_host_probe.py --model "$MODEL" --steps 1,${DS:-4} \
    >>"$OUT/engine.jsonl" 2>>"$OUT/bench.err"
}

_load() {  # target label: saturation (256 at once), then 50% and 90% of its request rate
  local target=$1 label=$2
  timeout 120 $PY -m jaxinfer.bench serving --target "$target" --rates inf \
    --num-requests ${NREQ:-256} --prompt-len ${PL:-128} --gen-len ${GL:-256} --warmup 64 \
    | sed "s/^{/{\"label\": \"$label\", /" >>"$OUT/engine.jsonl" 2>>"$OUT/loadgen.err"
  local rps; rps=$($PY -c "import json; r=[json.loads(l) for l in open('$OUT/engine.jsonl')]; print([x['value'] for x in r if x.get('metric') == 'req_s' and x.get('label') == '$label'][-1])")
  local rates; rates=$($PY -c "print(f'{0.5*$rps:.2f},{0.9*$rps:.2f}')")
  timeout 150 $PY -m jaxinfer.bench serving --target "$target" --rates "$rates" \
    --num-requests ${NREQ_LOAD:-300} --prompt-len ${PL:-128} --gen-len ${GL:-256} \
    | sed "s/^{/{\"label\": \"$label\", /" >>"$OUT/engine.jsonl" 2>>"$OUT/loadgen.err"
}

serving() {  # time to SERVING cold and warm, saturation and 50%/90% load, host time (metrics)
  local cc=/tmp/jaxinfer_cc port=50061 mport=9161
  local flags=(--model "$MODEL" --port $port --metrics-port $mport --decode-steps ${DS:-4}
               --compile-cache $cc --log-level INFO)
  rm -rf $cc
  for start in cold warm; do
    step "server $start start"
    local t0; t0=$(date +%s.%N)
    $PY -m serve "${flags[@]}" >>"$OUT/server.log" 2>&1 &
    local pid=$!
    $PY benchmarks/wait_serving.py 127.0.0.1:$port --timeout 300 --label "$start" \
      --since "$t0" >>"$OUT/engine.jsonl" || { kill -9 $pid; return 1; }
    if [ $start = cold ]; then
      step "saturation + load sweep"
      _load 127.0.0.1:$port "ds${DS:-4}"
      scrape $mport >"$OUT/metrics_after.txt"
    fi
    kill -TERM $pid; wait $pid; echo "server exit $? ($start)" >>"$OUT/campaign.log"
  done
}

serving_sweep() {  # saturation + 50%/90% load for each server config in CONFIGS (label:flags;...)
  local port=50065
  IFS=';' read -ra cfgs <<<"${CONFIGS:-b512:--max-num-batched-tokens 512 --prefill-rows 1,4}"
  for c in "${cfgs[@]}"; do
    local label=${c%%:*} flags=${c#*:}
    step "server $label ($flags)"
    local t0; t0=$(date +%s.%N)
    $PY -m serve --model "$MODEL" --port $port --compile-cache /tmp/jaxinfer_cc $flags \
      --log-level INFO >>"$OUT/server_sweep.log" 2>&1 &
    local pid=$!
    $PY benchmarks/wait_serving.py 127.0.0.1:$port --timeout 300 --label "$label" \
      --since "$t0" >>"$OUT/engine.jsonl" || { kill -9 $pid; return 1; }
    _load 127.0.0.1:$port "$label"
    kill -TERM $pid; wait $pid; echo "server exit $? ($label)" >>"$OUT/campaign.log"
  done
}

decode_steps_sweep() {  # the ITL/throughput trade-off of multi-step decoding
  local port=50064
  for ds in ${DS_SWEEP:-1 4}; do
    step "server --decode-steps $ds"
    local t0; t0=$(date +%s.%N)
    $PY -m serve --model "$MODEL" --port $port --decode-steps $ds --compile-cache /tmp/jaxinfer_cc \
      --log-level WARNING >>"$OUT/server_ds.log" 2>&1 &
    local pid=$!
    $PY benchmarks/wait_serving.py 127.0.0.1:$port --timeout 300 --label "ds$ds" \
      --since "$t0" >>"$OUT/engine.jsonl" || { kill -9 $pid; return 1; }
    _load 127.0.0.1:$port "ds$ds"
    kill -TERM $pid; wait $pid; echo "server exit $? (ds $ds)" >>"$OUT/campaign.log"
  done
}

serving_dp() {  # a 2-GPU machine: saturation throughput with one engine vs two replicas
  local cc=/tmp/jaxinfer_cc port=50062
  rm -rf $cc
  for mesh in dp=1 dp=2; do
    step "server --mesh $mesh"
    local t0; t0=$(date +%s.%N)
    $PY -m serve --model "$MODEL" --kernels "${KERNELS:-pallas}" --port $port --mesh $mesh \
      --num-pages ${PAGES:-4096} --compile-cache $cc --log-level WARNING >>"$OUT/server_dp.log" 2>&1 &
    local pid=$!
    $PY benchmarks/wait_serving.py 127.0.0.1:$port --timeout 300 --label "$mesh" \
      --since "$t0" >>"$OUT/serving_dp.jsonl" || { kill -9 $pid; return 1; }
    timeout 150 $PY -m jaxinfer.bench serving --target 127.0.0.1:$port --rates inf \
      --num-requests ${NREQ:-512} --prompt-len ${PL:-128} --gen-len ${GL:-256} --warmup 64 \
      >>"$OUT/serving_dp.jsonl" 2>>"$OUT/loadgen_dp.err"
    kill -TERM $pid; wait $pid; echo "server exit $? ($mesh)" >>"$OUT/campaign.log"
  done
}

serving_multihost() {  # a 2-GPU machine: tp=2 in one process vs two processes (one GPU each)
  # HOWS may add "tp1" (one GPU, same load) for a baseline measured in the same run
  local cc=/tmp/jaxinfer_cc port=50063
  local flags=(--model "$MODEL" --kernels "${KERNELS:-pallas}" --port $port
               --num-pages ${PAGES:-4096} --compile-cache $cc --log-level WARNING)
  rm -rf $cc
  for how in ${HOWS:-one_process two_processes}; do
    step "server $how"
    local t0 pids=(); t0=$(date +%s.%N)
    if [ $how = tp1 ]; then
      $PY -m serve "${flags[@]}" --mesh tp=1 >>"$OUT/server_mh.log" 2>&1 & pids+=($!)
    elif [ $how = one_process ]; then
      $PY -m serve "${flags[@]}" --mesh tp=2 >>"$OUT/server_mh.log" 2>&1 & pids+=($!)
    else
      for i in 0 1; do
        CUDA_VISIBLE_DEVICES=$i $PY -m serve "${flags[@]}" --mesh tp=2 --coordinator 127.0.0.1:50071 \
          --num-processes 2 --process-id $i >>"$OUT/server_mh_p$i.log" 2>&1 & pids+=($!)
      done
    fi
    $PY benchmarks/wait_serving.py 127.0.0.1:$port --timeout 300 --label "$how" \
      --since "$t0" >>"$OUT/serving_mh.jsonl" || { kill -9 "${pids[@]}"; return 1; }
    timeout 150 $PY -m jaxinfer.bench serving --target 127.0.0.1:$port --rates inf \
      --num-requests ${NREQ:-256} --prompt-len ${PL:-128} --gen-len ${GL:-256} --warmup 64 \
      >>"$OUT/serving_mh.jsonl" 2>>"$OUT/loadgen_mh.err"
    kill -TERM "${pids[0]}"; for p in "${pids[@]}"; do wait $p; echo "exit $? ($how)" >>"$OUT/campaign.log"; done
  done
}

qmatmul_rerun() {  # after a fix: the qmatmul GPU tests and the fp8 rows past M = 1024
  step "qmatmul gpu tests"
  JAX_PLATFORMS=cuda timeout 150 $PY -m pytest -m gpu -q -p no:cacheprovider \
    tests/pallas_kernels/test_qmatmul.py 2>&1 | tail -15 >>"$OUT/kernels_extra.log"
  step "fp8 rows M=4096,8192"
  timeout 200 $PY -c "
import json
from jaxinfer.kernel_bench import qmatmul as q
for m in (4096, 8192):
    for row in q.run_case(q.Case('fp8', m, 8192, 8192), iterations=20):
        print(json.dumps(row), flush=True)
" >>"$OUT/kernels_extra.log" 2>>"$OUT/bench.err"
}

mesh() {
  step "mesh sweep ${MESH_MODEL:-llama-3.1-8b-shape}"
  timeout 560 $PY -m jaxinfer.bench --model "${MESH_MODEL:-llama-3.1-8b-shape}" \
    --meshes "${MESHES:-tp=1;tp=2;pp=2;dp=2;tp=2,pp=2}" --batch "${MESH_BATCH:-1,32,64}" \
    --prompt-len 128 --gen-len 256 --decode-steps 16 --repeat 2 ${UNROLL:+--unroll-layers $UNROLL} \
    ${KERNELS:+--kernels $KERNELS} \
    --chart "$OUT/mesh_sweep.png" >"$OUT/mesh_sweep.jsonl" 2>"$OUT/mesh.err"
}

trace() {  # per-kernel time, stream idle gaps and HLO collectives of the 8B decode, per mesh
  step "decode trace ${TRACE_MESHES:-tp=1;tp=2}"
  MESHES="${TRACE_MESHES:-tp=1;tp=2}" timeout ${TTRACE:-300} $PY benchmarks/decode_trace_probe.py \
    >>"$OUT/decode_trace.jsonl" 2>>"$OUT/trace.err"
}

mesh_70b() {  # the 70B shape (141 GB of bf16 weights) on the GPUs there are: batch 1 and 32
  step "70B shape, --meshes ${MESHES_70B:-tp=2}"
  timeout ${T70B:-300} $PY -m jaxinfer.bench --model llama-3-70b-shape --meshes "${MESHES_70B:-tp=2}" \
    --batch 1,32 --prompt-len 128 --gen-len 256 --decode-steps 16 --repeat 1 \
    ${KERNELS:+--kernels $KERNELS} >"$OUT/mesh_70b.jsonl" 2>"$OUT/mesh_70b.err"
}

# train_models: train the tokenizer once, then the demo, draft and target models on the Python
# standard library (benchmarks/train_models.py), measure draft/target greedy agreement, keep
# the small demo model. About 7 minutes; T_DEMO, T_DRAFT, T_TARGET cap the seconds each model
# trains (its schedule is fitted to them or to the preset's epochs, whichever ends first),
# TRAIN_ARGS / AGREE_ARGS add flags. The corpus is STDLIB (default .corpus/stdlib.tar.gz, a full
# CPython Lib packed on the dev machine by `python benchmarks/train_models.py --pack-stdlib
# .corpus/stdlib.tar.gz` and carried; without it, this machine's stripped stdlib). Writes
# train_models.jsonl, train_models.err, train_demo.tar.gz, train_samples.txt.
_train_timing() {  # what, exit status, start (epoch s) -> one JSON line
  echo "{\"event\": \"timing\", \"model\": \"$1\", \"rc\": $2, \"wall_s\": $(($(date +%s) - $3))}"
}

train_models() {
  local work=${TRAIN_WORK:-/tmp/train_models} log="$OUT/train_models.jsonl"
  local err="$OUT/train_models.err" name budget t0 t_all corpus=()
  local stdlib=${STDLIB:-.corpus/stdlib.tar.gz}
  [ -e "$stdlib" ] && corpus=(--stdlib "$stdlib")
  rm -rf "$work"
  mkdir -p "$work"
  t_all=$(date +%s)
  # The demo run trains the tokenizer into $work/tok; draft and target reuse it.
  for spec in "demo ${T_DEMO:-90}" "draft ${T_DRAFT:-60}" "target ${T_TARGET:-180}"; do
    read -r name budget <<<"$spec"
    step "train $name (budget ${budget}s)"
    t0=$(date +%s)
    timeout $((budget + 75)) $PY benchmarks/train_models.py --preset "$name" \
      --out "$work/$name" --tokenizer "$work/tok" --time-budget "$budget" "${corpus[@]}" ${TRAIN_ARGS:-} \
      >>"$log" 2>>"$err"
    _train_timing "$name" $? "$t0" >>"$log"
    if [ "$name" = demo ] && [ -f "$work/demo/model.safetensors" ]; then
      tar -czf "$OUT/train_demo.tar.gz" -C "$work" demo
    fi
  done
  step "draft/target agreement"
  t0=$(date +%s)
  timeout 90 $PY benchmarks/train_models.py --measure-agreement "$work/draft" "$work/target" \
    "${corpus[@]}" ${AGREE_ARGS:-} >>"$log" 2>>"$err"
  _train_timing agreement $? "$t0" >>"$log"
  _train_timing all 0 "$t_all" >>"$log"
  $PY - "$log" >"$OUT/train_samples.txt" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r.get("event") == "final":
        print(f"==== {r['model']}: val_loss {r['val_loss']} nats/token, step {r['best_step']}"
              f" of {r['steps']}, {r['params']} params")
        for s in r["samples"]:
            print(f"---- prompt {s['prompt']!r}\n{s['prompt']}{s['completion']}\n")
    elif r.get("event") in ("agreement", "timing"):
        print(json.dumps(r))
EOF
}

step done

# spec_pair: train the draft and target (as train_models, the demo's tokenizer from .corpus/tok),
# then tok/s of the target with and without speculation on validation prompts (.corpus/val.txt:
# the validation split's files, written on the dev machine; carry .corpus). Writes
# spec_pair.jsonl (bench rows) and spec_pair_train.jsonl. SPEC_PAIR_MODES picks the bench runs.
spec_pair() {
  local work=${TRAIN_WORK:-/tmp/spec_pair} corpus=() t0
  local stdlib=${STDLIB:-.corpus/stdlib.tar.gz}
  [ -e "$stdlib" ] && corpus=(--stdlib "$stdlib")
  mkdir -p "$work"
  for spec in "draft ${T_DRAFT:-60}" "target ${T_TARGET:-180}"; do
    read -r name budget <<<"$spec"
    step "train $name (budget ${budget}s)"
    t0=$(date +%s)
    timeout $((budget + 75)) $PY benchmarks/train_models.py --preset "$name" --out "$work/$name" \
      --tokenizer .corpus/tok --time-budget "$budget" "${corpus[@]}" \
      >>"$OUT/spec_pair_train.jsonl" 2>>"$OUT/spec_pair.err"
    _train_timing "$name" $? "$t0" >>"$OUT/spec_pair_train.jsonl"
  done
  local common=(--model "$work/target" --batch ${SPEC_BATCH:-1,8,32,64} --prompt-len 128
                --gen-len 128 --repeat 2 --prompt-file .corpus/val.txt)
  local draft="{\"method\": \"draft_model\", \"model\": \"$work/draft\""
  local -A cfgs=([plain]="" [draft]="$draft, \"num_speculative_tokens\": 3}"
                 [draft_adaptive]="$draft, \"num_speculative_tokens\": 3, \"adaptive\": true}"
                 [ngram]='{"method": "ngram", "num_speculative_tokens": 3}')
  local mode cfg
  for mode in ${SPEC_PAIR_MODES:-plain draft draft_adaptive ngram}; do  # a subset: device time
    cfg=${cfgs[$mode]}
    step "bench target ${cfg:-plain}"
    timeout 150 $PY -m jaxinfer.bench "${common[@]}" ${cfg:+--speculative-config "$cfg"} \
      >>"$OUT/spec_pair.jsonl" 2>>"$OUT/spec_pair.err"
  done
}

# spec_repeat: n-gram lookup on validation prompts whose continuation quotes them
# (--prompt-style repeat) and on plain windows, on REPEAT_MODEL (default: the bundled demo;
# the trained target of spec_pair where it exists). Writes spec_repeat.jsonl.
spec_repeat() {
  local model=${REPEAT_MODEL:-demo}
  local common=(--model "$model" --batch ${SPEC_BATCH:-1,8,32,64} --prompt-len 128 --gen-len 128
                --repeat 2 --prompt-file .corpus/val.txt)
  local ngram='{"method": "ngram", "num_speculative_tokens": 3'
  for style in repeat window; do
    for cfg in "" "$ngram}" "$ngram, \"adaptive\": true}"; do
      step "bench $model $style prompts ${cfg:-plain}"
      timeout 120 $PY -m jaxinfer.bench "${common[@]}" --prompt-style $style \
        ${cfg:+--speculative-config "$cfg"} >>"$OUT/spec_repeat.jsonl" 2>>"$OUT/spec.err"
    done
  done
}

# spec_synthetic: the speed of speculative steps against acceptance on the 1B shape (the
# bench-only synthetic proposer), and n-gram lookup on the bundled demo model's validation
# prompts. Writes spec_synthetic.jsonl.
spec_synthetic() {
  local common=(--model "$MODEL" --batch ${SPEC_BATCH:-1,8,32,64} --prompt-len 128 --gen-len 128
                --repeat 2)
  step "bench 1B plain"
  timeout 120 $PY -m jaxinfer.bench "${common[@]}" >>"$OUT/spec_synthetic.jsonl" 2>>"$OUT/spec.err"
  for k in ${SPEC_KS:-1 3 7}; do
    for a in ${SPEC_RATES:-0.8}; do
      step "bench 1B synthetic k=$k acceptance=$a"
      timeout 120 $PY -m jaxinfer.bench "${common[@]}" --speculative-config \
        "{\"method\": \"synthetic\", \"num_speculative_tokens\": $k, \"acceptance_rate\": $a}" \
        >>"$OUT/spec_synthetic.jsonl" 2>>"$OUT/spec.err"
    done
  done
}

# spec_curve: tok/s against acceptance on $MODEL with the bench-only synthetic proposer, each k
# in SPEC_KS over SPEC_RATES on one set of compiled programs (--acceptance-rates), then adaptive
# depth (tiers 0, 1, 3, 7) over the same rates. Writes spec_curve_$MODEL.jsonl.
spec_curve() {
  local common=(--model "$MODEL" --batch ${SPEC_BATCH:-1,8,32,64} --prompt-len 128 --gen-len 128
                --repeat 2) rates=${SPEC_RATES:-0.5,0.6,0.7,0.8,0.9}
  local log="$OUT/spec_curve_$MODEL.jsonl" syn='{"method": "synthetic", "acceptance_rate": 0.8'
  step "bench $MODEL plain"
  timeout ${SPEC_TIMEOUT:-150} $PY -m jaxinfer.bench "${common[@]}" >>"$log" 2>>"$OUT/spec.err"
  for k in ${SPEC_KS:-1 3 7}; do
    step "bench $MODEL synthetic k=$k rates $rates"
    timeout ${SPEC_TIMEOUT:-150} $PY -m jaxinfer.bench "${common[@]}" --acceptance-rates "$rates" \
      --speculative-config "$syn, \"num_speculative_tokens\": $k}" >>"$log" 2>>"$OUT/spec.err"
  done
  if [ -n "${SPEC_ADAPTIVE:-1}" ]; then
    step "bench $MODEL synthetic adaptive rates $rates"
    timeout ${SPEC_TIMEOUT:-150} $PY -m jaxinfer.bench "${common[@]}" --acceptance-rates "$rates" \
      --speculative-config "$syn, \"num_speculative_tokens\": 7, \"adaptive\": true}" \
      >>"$log" 2>>"$OUT/spec.err"
  fi
}

# e2e: the end-to-end bench of the 1B shape (STYLE: after any change on the decode path), bf16
# and each quant mode, batch 1/32/64. Writes e2e_$MODEL.jsonl.
e2e() {
  for q in ${E2E_QUANTS:-none int8 fp8 int4-g128}; do
    step "e2e bench $MODEL quant=$q"
    timeout ${E2E_TIMEOUT:-170} $PY -m jaxinfer.bench --model "$MODEL" --kernels pallas --quant "$q" \
      --batch ${E2E_BATCH:-1,32,64} --prompt-len 128 --gen-len 256 --repeat 2 \
      >>"$OUT/e2e_$MODEL.jsonl" 2>>"$OUT/e2e.err"
  done
}

# quant_probe: benchmarks/quant_tuning_probe.py (issue 17): the old plan, the default and the
# variants of each quant kernel on each 1B projection at M = 1/32/64, beside XLA's bf16 dot.
# Writes quant_probe.jsonl.
quant_probe() {
  step "quant tuning probe $MODEL"
  MODEL=$MODEL timeout ${PROBE_TIMEOUT:-300} $PY benchmarks/quant_tuning_probe.py \
    >>"$OUT/quant_probe.jsonl" 2>>"$OUT/quant_probe.err"
}

# soak: the soak and chaos harness against a server it starts on the demo model (SOAK_MODEL):
# 1,000 streams at once for SOAK_S seconds (or SOAK_REQUESTS requests), the stalled phase, a
# burst SOAK_BURST x the queue (the issue's 10 by default), SIGTERM under load with 200 streams
# of SOAK_DRAIN_TOKENS tokens (on the H200 64 tokens end before the signal; 1024 do not).
# The server needs grpc health/reflection, fastapi, uvicorn, pyzmq and msgspec
# (where they are missing: `pip download -d .whl` them here, carry .whl, and first run
# `pip install --no-index --no-deps --target /tmp/site .whl/*.whl` with /tmp/site on PYTHONPATH).
# Writes soak_h200.jsonl, soak.err, soak_server.log.
soak() {
  step "soak ${SOAK_MODEL:-demo} ${SOAK_S:-300}s"
  local args="--requests ${SOAK_REQUESTS:-20000} --concurrency 1000 --duration ${SOAK_S:-300}"
  args+=" --burst ${SOAK_BURST:-10} --sigterm --drain-streams 200"
  args+=" --drain-tokens ${SOAK_DRAIN_TOKENS:-64}"
  local server="--model ${SOAK_MODEL:-demo} --max-queue 1024"
  echo "{\"command\": \"python -m serve.soak $args -- $server\"}" >"$OUT/soak_h200.jsonl"
  # shellcheck disable=SC2086  # the argument strings are split on purpose
  timeout $((${SOAK_S:-300} + 240)) $PY -m serve.soak $args \
    --server-log "$OUT/soak_server.log" -- $server >>"$OUT/soak_h200.jsonl" 2>"$OUT/soak.err"
  echo "soak exit $?" >>"$OUT/campaign.log"
}

for what in "$@"; do "$what"; done
