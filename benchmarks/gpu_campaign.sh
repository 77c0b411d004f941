#!/usr/bin/env bash
# One GPU measurement campaign per call of the device tool (METHOD.md: few, full calls).
#
#   bash benchmarks/gpu_campaign.sh kernels   # gpu_tests + kernel_bench
#   bash benchmarks/gpu_campaign.sh gpu_tests      # pytest -m gpu (serving tests need grpc health)
#   bash benchmarks/gpu_campaign.sh kernel_bench   # qmatmul bench, generate with pallas/quant
#   bash benchmarks/gpu_campaign.sh serving   # cold/warm start, load sweep, host time, offline b64
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

serving() {
  local cc=/tmp/jaxinfer_cc port=50061 mport=9161
  local flags=(--model "$MODEL" --kernels "${KERNELS:-pallas}" --port $port --metrics-port $mport
               --num-pages ${PAGES:-4096} --decode-steps 8 --compile-cache $cc --log-level WARNING)
  rm -rf $cc
  for start in cold warm; do
    step "server $start start"
    local t0; t0=$(date +%s.%N)
    $PY -m serve "${flags[@]}" >>"$OUT/server.log" 2>&1 &
    local pid=$!
    $PY benchmarks/wait_serving.py 127.0.0.1:$port --timeout 300 --label "$start" \
      --since "$t0" >>"$OUT/serving.jsonl" || { kill -9 $pid; return 1; }
    if [ $start = cold ]; then
      step "saturation + load sweep"
      timeout 150 $PY -m jaxinfer.bench serving --target 127.0.0.1:$port --rates inf \
        --num-requests ${NREQ:-256} --prompt-len ${PL:-128} --gen-len ${GL:-256} --warmup 64 \
        >>"$OUT/serving.jsonl" 2>>"$OUT/loadgen.err"
      scrape $mport >"$OUT/metrics_after.txt"
      local rps; rps=$($PY -c "import json,sys; r=[json.loads(l) for l in open('$OUT/serving.jsonl')]; print([x['value'] for x in r if x.get('metric') == 'req_s'][-1])")
      local r50 r90; r50=$($PY -c "print(round(0.5*$rps,2))"); r90=$($PY -c "print(round(0.9*$rps,2))")
      timeout 200 $PY -m jaxinfer.bench serving --target 127.0.0.1:$port --rates "$r50,$r90" \
        --num-requests ${NREQ:-300} --prompt-len ${PL:-128} --gen-len ${GL:-256} --plot "$OUT/serving_latency.png" \
        >>"$OUT/serving.jsonl" 2>>"$OUT/loadgen.err"
    fi
    kill -TERM $pid; wait $pid; echo "server exit $? ($start)" >>"$OUT/campaign.log"
  done
  step "offline batch 64"
  timeout 150 $PY -m jaxinfer.bench --model "$MODEL" --kernels "${KERNELS:-pallas}" --batch 64 \
    --prompt-len 128 --gen-len 256 --decode-steps 8 --repeat 2 >>"$OUT/serving.jsonl" \
    2>>"$OUT/bench.err"
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

for what in "$@"; do "$what"; done
step done
