#!/usr/bin/env bash
# One fresh GPU machine, one call, steps named in $1 (default "fhts"), each time-boxed so the whole
# call ends before the device tool's 10 minutes (results in $OUT/results.tar.gz):
#  f  issue 14: a fresh machine's first run (empty tuning and Triton caches, the shipped picks, compile
#     ahead) against the warm run, short and ~16k-token prompts at 6 GB; the short first run again
#     with LAYERSTREAM_COMPILE_AHEAD=processes and =0 (each with its own empty Triton cache)
#  l  issue 14: bench_prefill at 6 GiB and all resident, 8k and 16k tokens, prompt states in host memory and in VRAM
#  p  issue 14: the short first and warm runs at 6 GB again under py-spy (every thread, waits included;
#     fresh Triton and tuning caches), and tools.profile_summary's per-function difference of the two
#  h  issue 18: bench_stream --host-compute off,auto at 6 / 4 GiB, batch 1 and 4
#  a  issue 18: the host lane on the synthetic 7B AWQ (torch's int4 CPU kernel or widened layers, the faster
#     measured: engine/host_forms.py) at 3 / 4 GiB, batch 1 and 4, then the host lane's GPU tests (quantized
#     first); session 34 planned no host layer (the int4 rate measured in fp16, 1.2 GB/s: fixed in af16b1e)
#  P  issue 15: bench/probe_pair.py (the ladder's L0 against the access probe's rows kernel in the same tiles, on
#     each other's operands, alternated: session 34 had them 1.6x apart for the same sm_90 K loop)
#  t  GPU tests of compile ahead, the host lane and worker, host prompt states, the timeline
#  m  issue 14: memreport at 6 GB with its pictures (memory.png, timeline.png: decode steps and a prefill)
#  q  issue 15: the quantized prefill (bench_kernels --only qgemm,qprefill: the fused GEMM and the engine's
#     dense-tile path at 2048 tokens against bf16 cuBLAS) and the quantized GPU tests
#  k  issue 15: the quantized kernels' tests on the GPU (their PTX lop3 unpack and dp4a never run in the
#     interpreter) and the CUDA parity test (prints each path's error against the fp32 torch path)
#  x  issue 15: bench/quant_decode_check.py on the 7B AWQ (the parity test's first-decode-step failure), runs named
#     by $X_VARIANTS (default all): plain (as the test), sync (CUDA_LAUNCH_BLOCKING=1), first (the Triton engine
#     first), noahead (LAYERSTREAM_COMPILE_AHEAD=0); and, named only, int8 (with the int8-x GEMV: its accuracy at
#     the 7B's shapes), perturb (8 more bf16 torch runs, each linear's output off by 0.3%: the spread of each step's
#     logits error); about 100 s each
#  i  issue 15: the int8-x GEMV (kernels/qgemv_i8.py, dp4a) on the GPU: its tests, then bench/probe_qkernels.py
#     at batch 1 (every variant's best at the 7B's shapes, % of copy)
#  v  issue 15: the fused decode RoPE + KV append's tests on the GPU; the synthetic 7B AWQ at 6 GiB against the
#     all-resident bf16 7B, batch 1 (target 1.5x the tok/s); then tools.profile_decode of both (kernels by kind)
#  w  issue 15: bench/qgemv_sweep.py (arguments from $W_ARGS), the int4 decode GEMV over a wider launch grid than the tuner's
#  s  issue 16: bench_serve at 6 GiB, 1/4/16/32 clients, and all resident; tools.ttft_breakdown of each level
#     (S_KV="--kv-cache paged": on the paged cache, its last slices packed; S_LEVELS=1,4: those levels;
#     S_RES= : no all-resident run)
#  n  issues 16 / 14: bench/intake_probe.py (16 prompts at once, one pass with host prompt states, at 6 GiB with
#     32 slots) on the slot and the paged cache, each with its states parked or not, the paged one with and without
#     packed slices; issue 14's table: bench_prefill at 4 GiB, 6 GiB and all resident, 2k-32k
#     tokens (context 32k: at 4 GiB the plan keeps host states, parked in the KV cache's unreached positions where
#     they fit); then, given $N_ENV (e.g. LAYERSTREAM_PARK_STATES=0: the states in host memory), 4 GiB 8k / 16k with it
#  e  GPU tests of parked prompt states and of packed slices in a warmed-up server
#  r  issue 16: bench/first_request_probe.py (a warmed-up server's first requests alone: time, compiles, tuning)
#  b  issue 16: bench/burst_probe.py (the 16-client level's burst in process, no HTTP: each pass until every first
#     token, twice); run before s on one machine, its passes against the served ones in steps.jsonl
#  u  issue 16: bench_serve on the synthetic 7B AWQ at 6 GiB, 1/4/16/32 clients (U_LEVELS), and its TTFT breakdown;
#     U_RPC=N: each client sends N requests one after the other (default 1: the level is one burst of arrivals);
#     U_PROFILE=N: the server's first N prompt passes under cProfile into passprof/ (engine/serving/passprof.py)
#     U_ARMS="TAG[:VAR=VALUE,...] ...": the levels once per arm, under its variables (default "awq": none set);
#     an arm's U_RPC=N is its own requests a client (e.g. "cold:U_RPC=1 steady:U_RPC=3")
#  g  issue 16: the synthetic 7B AWQ served at 1 and 16 clients with its outputs held until the next pass is queued
#     (the server's default) and with LAYERSTREAM_HOLD_OUTPUTS=0 (each step's at its end), on one machine
#  d  bench/decode_step_probe.py on the synthetic 7B AWQ: served decode steps in process at 1 and 16 sequences,
#     timed, then profiled (the copy engine's idle gaps and the host calls during each)
#  z  bench/nonfinite_probe.py on the synthetic 7B AWQ (Z_DTYPE, default the checkpoint's fp16): which serving pass
#     first gives non-finite logits
#  y  issue 16: bench/burst_probe.py --profile on the synthetic 7B AWQ and the bf16 7B at 6 GiB (the 16-client burst
#     in process, then one more whose first pass runs under torch's profiler: its kernels by kind), to see why the
#     AWQ's served passes cost ~1.6x the bf16's per prompt token; the AWQ again with LAYERSTREAM_STACK_PROMPTS=0
#     (Y_RUNS="awq:/tmp/q7b-awq:1": only the runs named, tag:model:stacked)
#  j  issue 16: the dense tile's size (LAYERSTREAM_DEQUANT_SCRATCH, sizes in $J_SIZES, default 64MiB 512MiB twice,
#     alternated) on the synthetic 7B AWQ at 6 GiB: the 16-prompt burst in process (burst_probe: fewer dequantize + GEMM
#     launches a pass with whole projections per tile) and batch-1 decode (bench_stream: fewer resident layers)
#  o  GPU tests of session 27's unmeasured changes (the kept dense tile, RoPE + KV append for prompt groups);
#     then `U_LEVELS=1,16,32 ... ou`: the AWQ 32-client level that ran out of memory in session 27's call 5
#  E  issue 15: bench/probe_epilogue.py (the K loop and the int8-x GEMV in its default, WORDS2D and TRANS code layouts,
#     same tiles), then bench/probe_qkernels.py at batch 1 with each layout (LAYERSTREAM_I8_WORDS2D / _TRANS)
#  H  issue 18: bench/probe_int4_layer_rate.py --contend (the 7B's int4 layer on torch's CPU kernel: projections,
#     the whole layer as the lane runs it, alone and next to host-to-device copies)
#  M  issue 18: bench/probe_lane_memory.py at batch 1 and 4 (a bf16 layer's projections in plain, registered and
#     pinned memory, alone and next to copies out of 128 MiB and out of 2 GiB of distinct buffers)
#  A  issue 18: the synthetic 7B AWQ at 3 / 4 GiB batch 1, --host-compute off,auto,auto: the second auto plans
#     from the rate the first one's lane achieved (memory.host_rate.record_achieved)
#  T  issue 18: bench/thread_sampler.py around bench_stream's host lane repeated (AWQ 4 GiB, bf16 6 GiB, batch 1):
#     which threads ran where and the hypervisor's steal while the lane's time varied
#  N  issue 18: bench/probe_mem_placement.py (the lane's bf16 GEMV rate per 1 GiB buffer, 24 plain and 16 pinned,
#     three passes: buffers slower pass after pass would be memory the VM's host places farther away)
#  L  issue 18: bench/probe_llc_rate.py (the lane's GEMV rate on 128 MiB to 2 GiB weights, alternated: whether the
#     256 MiB weight memory.host_rate timed before session 39 read the last-level cache)
#  G  issue 18: the guard on a GPU: engine.run on the bf16 7B at 6 GB, --host-compute off, auto, then auto planned
#     from host rates 4x those measured (bench/lie_host_rate.py): the lane must lose and be retired mid-run (its
#     warning in the log), then auto once more, planned from the rate the retired lane achieved (kept in the lying cache)
#  R  issue 18: bench/guard_probe.py under host rates 4x those measured: each decode step's time across the lane's
#     retirement (the graph captured again without the lane), then on the same engine with that graph, then eager
#  K  issue 18: engine.run on the bf16 7B at 6 GB, --host-compute auto then off, beside bench/mem_hog.py (12 threads
#     copying 1 GiB buffers): the lane planned without the hog loses, the guard re-plans it (fewer host layers) or
#     retires it, the graph is captured again; then the GPU tests of the guard and of compile ahead (with a host lane)
#  F  issues 14 / 18: f's short prompt only, first (fresh Triton, tuning and measured-rates caches: since session 40
#     the rates follow LAYERSTREAM_CACHE, so the first run measures H2D and, with --host-compute auto, the host lane's
#     rate) against cached
#  Q  issue 15: o_proj's x rounded in the decode attention's epilogue (LAYERSTREAM_ROUND_IN_ATTENTION=1) against its
#     own launch (=0), the synthetic 7B AWQ at 6 GiB batch 1, alternated 0 1 0 1; first the GPU tests of the epilogue,
#     the fused op and the engine's tokens with it, and bench/round_check.py (whether the engine's o_proj takes the
#     fused path at all: only where its tuned GEMV is the int8-x one)
#  B  issue 16: bench/burst_probe.py --trace on the synthetic 7B AWQ at 6 GiB (the 16-client burst in process, each
#     pass's queued time against its wall time, then one first pass traced with CUDA activity only: the compute
#     stream's idle gaps by cause, host or device, bench/pass_gaps.py); then the same for the bf16 7B (B_BF16=1)
#  X  issue 16: the 16-client burst's passes in process (bench/burst_probe.py, synthetic 7B AWQ at 6 GiB), one process
#     an arm, alternated (X_ORDER, default "nofill fill fast nofill fill fast"): nofill LAYERSTREAM_FILL_STACKS=0 (prompt
#     slices of a chunk, before session 42), fill the defaults (slices filling the stacks), fast with
#     LAYERSTREAM_FAST_LAUNCH=1 (direct launches keyed on Triton's specialization since session 42), prof the
#     defaults with a third burst's first pass under cProfile (where the host's ~90 us a kernel go); first
#     fastlaunch's GPU test
#  V  issue 16: stacked prompt slices in one RoPE + append and one attention launch a layer (engine/varlen.py, on
#     by default since session 45, LAYERSTREAM_VARLEN_PREFILL=0 off): its GPU tests, the in-process burst alternated
#     off / on, and the served cold burst (1 and 16 clients, one request each) on then off, with the kernels built while serving
#  S  issue 16: the in-process burst (synthetic 7B AWQ) with units of more rows: S_ORDER "budget:rows[:pieces]" arms
#     (rows 0: the default, one prefill chunk; else LAYERSTREAM_STACK_ROWS; pieces: LAYERSTREAM_MLP_PIECES, the MLP
#     of a longer unit in that many pieces, engine/mlp_chunks.py), default "6:0 9:0 9:16384 9:0 9:16384";
#     S_TESTS=1: first the GPU tests of the pieces' kernels and loop
#  I  issue 16: a pass's prompts as one unit, its MLP in pieces (LAYERSTREAM_STACK_PIECES=1), against units of one
#     chunk: the in-process burst (I_ORDER, default "pieces chunk pieces"), then the served cold burst (1 and 16
#     clients, I_SERVE, default "pieces chunk")
#  C  issue 16: prompt units through captured CUDA graphs (engine/prompt_graphs.py, LAYERSTREAM_PROMPT_GRAPHS=1): its
#     GPU tests, the in-process burst with arms alternated round by round (bench/unit_ab.py: chunk / graphs), then the
#     served cold burst (1 and 16 clients) with graphs and without (C_SERVE, default "graphs chunk"); C_BUDGETS: the
#     in-process burst's budgets (default 7GiB: at 6 GiB the graphs' pool leaves the eager arm short of memory)
#  D  issue 16: the streamed lm_head's last chunks copied ahead in a burst's prompt passes (engine/head_ahead.py,
#     LAYERSTREAM_HEAD_AHEAD=1) and each layer's packed weights widened once for a pass's units (engine/dense_layer.py,
#     LAYERSTREAM_DENSE_LAYER=1): their GPU tests, the in-process burst at 6 GiB with arms alternated
#     (bench/unit_ab.py: chunk / ahead / dense / both; D_ARMS), then the served cold burst (1 and 16 clients, D_SERVE,
#     default "both chunk"; arms chunk / ahead / dense / both / default: no variable set); D_ARMS= (empty): no A/B
#  J  issue 16: a served pass's decoding rows through the decode step's graphs beside its prompts (engine/graph_unit.py):
#     bench/mixed_probe.py on the synthetic 7B AWQ at 6 GiB (a 1,050-token prompt alone, and
#     beside 15 decoding rows, arms J_ARMS alternated: default (the unit, on since session 53) / runner:graph_unit=0
#     (eager) / runner:stack_packed=1), a mixed pass of each arm in J_TRACE traced; with u, e.g.
#     U_ARMS="awq eager:LAYERSTREAM_GRAPH_UNIT=0" for the served level with and without
#  W  the graph unit's GPU tests (run after J and before u, so the served arms cannot squeeze them out)
#  c  issue 16: the accelerate peer serving the 1-client level's requests one by one (its own step: its
#     load alone took the rest of session 10's and 11's calls)
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
source bench/common.sh  # carried wheels, env_info, synth_7b
OUT=${OUT:-/tmp/out}; R=/tmp/results; rm -rf $R; mkdir -p "$OUT" $R; M=/tmp/q7b
steps=${1:-fhts}; END=$(( $(date +%s) + ${BOX:-545} ))
left() { local l=$(( END - $(date +%s) )); (( l > $1 )) && echo $1 || echo $(( l > 5 ? l : 5 )); }
# COLD_LEVELS (default 1,16): the levels of every served cold burst below; a level named again is another burst of new
# prompts in the same server (e.g. 1,16,16,16: three cold 16-client bursts a server start; tools.ttft_breakdown reads each)
cold_burst() {  # TAG [VAR=VALUE...]: the served cold burst of the 7B AWQ at 6 GiB (1 and 16 clients, one request
  local t=$1; shift  # each) under those variables: TTFT, its breakdown, kernels built while serving, peak memory,
  # each prompt pass's time a token and the allocator counters that grew in it (new pinned blocks, device allocations)
  local S="--model /tmp/q7b-awq --vram-budget 6GiB --max-batch 32 --max-context 2304 --step-log $R/steps_$t.jsonl"
  local n; n=$(tr , "\n" <<< "${COLD_LEVELS:-1,16}" | wc -l)  # 150 s for two levels, 30 s more for each further one
  env "$@" timeout $(left $((90 + 30 * n))) python3 -m tools.bench_serve --serve "$S" --clients ${COLD_LEVELS:-1,16} --requests-per-client 1 \
    --prompt-tokens 128:2048 --max-tokens 128:256 --json $R/serve_$t.json > $R/bench_serve_$t.log 2>&1
  echo "serve $t rc=$?"; grep "clients:" $R/bench_serve_$t.log
  python3 -m tools.ttft_breakdown $R/serve_$t.json $R/steps_$t.jsonl --config server > $R/ttft_$t.txt 2>&1
  grep -E "TTFT p50|target|admitted" $R/ttft_$t.txt
  python3 -c "import json,sys; r=[json.loads(l) for l in open(sys.argv[1])]; print('kernels built after the first step:', sum(x['compiles'] for x in r[1:]), 'peak MiB', max(x['peak_mib'] for x in r), 'graph replays', sum(x.get('graph_replays', 0) for x in r))" $R/steps_$t.jsonl
  python3 bench/pass_costs.py $R/steps_$t.jsonl | tee $R/pass_costs_$t.txt
}
awq_7b() { [ -f /tmp/q7b-awq/config.json ] || timeout $(left 90) python3 -m tools.synth --preset qwen2.5-7b \
  --out /tmp/q7b-awq --quant awq --device cuda 2>&1 | tail -1; }  # the synthetic 7B AWQ (centred codes)
env_info > $R/env.txt 2>&1
[[ "$steps" =~ ^[uzywgdjoaPEHAMNLiQBXVSICDJW]+$ ]] || synth_7b $M  # u, z, w, g, d, j, o, a, P, i, L, V, J, W need no bf16 checkpoint; y makes it after its AWQ run
if [[ $steps == *f* ]]; then
  for p in short 16k; do
    A=(); [ $p = 16k ] && A=(--prompt-words 8000 --max-context 20000 --max-new-tokens 4)
    timeout $(left 100) python3 -m tools.bench_startup --model $M --vram-budget 6GB --runs first,cached \
      --triton-cache fresh --cache-dir /tmp/ls-$p "${A[@]}" --timeout 60 --out $R/startup_$p.json > $R/startup_$p.txt 2>&1
    cat $R/startup_$p.txt
  done
  for a in processes 0; do
    LAYERSTREAM_COMPILE_AHEAD=$a timeout $(left 60) python3 -m tools.bench_startup --model $M --vram-budget 6GB \
      --runs first --triton-cache fresh --cache-dir /tmp/ls-ahead$a --timeout 55 --out $R/startup_short_ahead$a.json \
      > $R/startup_short_ahead$a.txt 2>&1; cat $R/startup_short_ahead$a.txt
  done
save; fi
if [[ $steps == *l* ]]; then  # issue 14: the bounded host prompt states (never measured on a GPU since bounded)
  for st in host vram; do
    timeout $(left 150) python3 -m tools.bench_prefill --model $M --budgets 6GiB,full --tokens 8192,16384 \
      --prefill-states $st --out $R/prefill_$st.json > $R/prefill_$st.txt 2>&1; echo "prefill $st rc=$?"
    grep -v Warning $R/prefill_$st.txt | tail -8
  done
save; fi
if [[ $steps == *p* ]]; then
  timeout $(left 150) python3 -m tools.bench_startup --model $M --vram-budget 6GB --runs first,cached \
    --triton-cache fresh --cache-dir /tmp/ls-prof --timeout 70 --profile-dir $R/profile --out $R/startup_profiled.json \
    > $R/startup_profiled.txt 2>&1; cat $R/startup_profiled.txt
  python3 -m tools.profile_summary $R/profile/first.speedscope.json --base $R/profile/cached.speedscope.json \
    --top 40 --root $PWD > $R/profile_diff.txt 2>&1; head -45 $R/profile_diff.txt
save; fi
if [[ $steps == *m* ]]; then
  timeout $(left 70) python3 tools/memreport.py --model $M --vram-budget 6GB --prompt-tokens 2048 --context 4096 --out-dir $R/memreport \
    > $R/memreport.txt 2>&1; echo "memreport rc=$?"; tail -25 $R/memreport.txt
save; fi
if [[ $steps == *h* ]]; then
  timeout $(left 150) python3 -m tools.bench_stream --model $M --budgets 6GiB,4GiB --batches 1,4 --steps 8 \
    --prefill-tokens 0 --host-compute off,auto --out-dir $R --tag hostlane > $R/bench_hostlane.log 2>&1
  echo "hostlane rc=$?"; tail -11 $R/bench_hostlane.log
  python3 -m tools.lane_trace $R --bus 2>&1 | tee $R/lane_trace.txt  # the traces against the step model, the bus
save; fi
if [[ $steps == *a* ]]; then  # issue 18's quantized host lane (session 34: the int4 rate now measured in bf16)
  awq_7b
  timeout $(left 200) python3 -m tools.bench_stream --model /tmp/q7b-awq --budgets 3GiB,4GiB --batches 1,4 --steps 8 \
    --prefill-tokens 0 --host-compute off,auto --out-dir $R --tag hostlane-awq > $R/bench_hostlane_awq.log 2>&1
  echo "hostlane awq rc=$?"; grep -E "GiB" $R/bench_hostlane_awq.log | tail -8
  save
  timeout $(left 120) python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_host_lane.py -k quantized \
    > $R/pytest_hostlane_q.txt 2>&1; echo "pytest quantized hostlane rc=$?"; tail -2 $R/pytest_hostlane_q.txt
  timeout $(left 200) python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_host_lane.py -k "not quantized" \
    > $R/pytest_hostlane.txt 2>&1; echo "pytest hostlane rc=$?"; tail -2 $R/pytest_hostlane.txt
save; fi
if [[ $steps == *P* ]]; then
  timeout $(left 120) python3 bench/probe_pair.py --out $R/pair.json > $R/pair.txt 2>&1; echo "pair rc=$?"; cat $R/pair.txt
save; fi
if [[ $steps == *t* ]]; then
  timeout $(left 150) python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_compile_ahead.py \
    tests/test_compile_ahead_procs.py tests/test_host_lane.py \
    tests/test_host_worker.py tests/test_prefill_host_states.py tests/test_gpu_timeline.py tests/test_gpu_graph_capture.py tests/test_gpu_serving.py tests/test_upload.py \
    > $R/pytest_gpu.txt 2>&1; echo "pytest rc=$?"; tail -8 $R/pytest_gpu.txt
save; fi
if [[ $steps == *q* ]]; then
  timeout $(left 200) python3 -m tools.bench_kernels --only qgemm,qprefill --out $R/kernels_qprefill.json \
    > $R/kernels_qprefill.txt 2>&1; echo "qprefill rc=$?"; tail -14 $R/kernels_qprefill.txt
  timeout $(left 150) python3 -m pytest -q -p no:cacheprovider tests/test_kernels_qdequant.py \
    tests/test_kernels_quant.py > $R/pytest_quant.txt 2>&1; echo "pytest rc=$?"; tail -4 $R/pytest_quant.txt
  timeout $(left 100) python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_quant_parity_gpu.py \
    > $R/pytest_quant_parity.txt 2>&1; echo "pytest rc=$?"; tail -4 $R/pytest_quant_parity.txt
save; fi
if [[ $steps == *k* ]]; then  # the GPU build of the quantized kernels (the PTX lop3 path runs only here)
  timeout $(left 300) python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels_qgemv_i8.py tests/test_kernels_qgemv_i8_fused.py \
    tests/test_kernels_quant_variants.py tests/test_kernels_quant.py > $R/pytest_quant_kernels.txt 2>&1; echo "pytest rc=$?"; tail -4 $R/pytest_quant_kernels.txt
  timeout $(left 200) python3 -m pytest -q -s -p no:cacheprovider -m cuda tests/test_quant_parity_gpu.py \
    > $R/pytest_quant_parity.txt 2>&1; echo "pytest rc=$?"; grep -E "bf16|passed|failed" $R/pytest_quant_parity.txt | tail -12
save; fi
if [[ $steps == *o* ]]; then  # session 27's changes measured nowhere yet: the kept tile, RoPE + KV append at T > 1
  timeout $(left 150) python3 -m pytest -q -p no:cacheprovider tests/test_kernels_rope_kv_append.py tests/test_kernels_qdequant.py \
    tests/test_gguf_native.py tests/test_kernels_gemm.py -k "not qwen_shapes" > $R/pytest_s27.txt 2>&1; echo "pytest rc=$?"
  tail -4 $R/pytest_s27.txt
save; fi
if [[ $steps == *i* ]]; then
  timeout $(left 120) python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels_qgemv_i8.py tests/test_kernels_qgemv_i8_fused.py \
    > $R/pytest_qgemv_i8.txt 2>&1; echo "pytest rc=$?"; tail -4 $R/pytest_qgemv_i8.txt
  timeout $(left 150) python3 bench/probe_qkernels.py --batches 1 --ggml '' --out $R/probe_m1.json \
    > $R/probe_m1.txt 2>&1; echo "probe rc=$?"; grep -E "qgemv|wrong" $R/probe_m1.txt | head -16
save; fi
if [[ $steps == *v* ]]; then
  awq_7b
  timeout $(left 90) python3 -m pytest -q -p no:cacheprovider tests/test_kernels_rope_kv_append.py tests/test_kernels_rope.py \
    > $R/pytest_rope_kv.txt 2>&1; echo "pytest rc=$?"; tail -3 $R/pytest_rope_kv.txt  # the fused decode RoPE + append
  timeout $(left 120) python3 -m tools.bench_stream --model /tmp/q7b-awq --budgets 6GiB --batches 1 --steps 8 \
    --prefill-tokens 0 --out-dir $R --tag awq > $R/bench_awq.log 2>&1; echo "awq rc=$?"; tail -4 $R/bench_awq.log
  timeout $(left 80) python3 -m tools.bench_stream --model $M --budgets full --batches 1 --steps 8 --prefill-tokens 0 \
    --out-dir $R --tag bf16-full > $R/bench_bf16_full.log 2>&1; echo "full rc=$?"; tail -3 $R/bench_bf16_full.log
  mkdir -p $R/tuning_home && cp ~/.cache/layerstream/tuning/*.json $R/tuning_home/ 2>/dev/null  # for export_tuning
  for pm in "awq /tmp/q7b-awq --vram-budget 6GiB" "bf16-full $M"; do  # where each step's time goes, per kernel
    set -- $pm; tag=$1; shift
    timeout $(left 90) python3 -m tools.profile_decode --model "$@" --steps 8 --json $R/profile_$tag.json \
      > $R/profile_$tag.txt 2>&1; echo "profile $tag rc=$?"; grep -v Warning $R/profile_$tag.txt | head -16
    if grep -q "no kernel recorded" $R/profile_$tag.txt; then  # the profiler did not see into the graph
      timeout $(left 90) python3 -m tools.profile_decode --model "$@" --steps 8 --cuda-graph off \
        --json $R/profile_${tag}_eager.json > $R/profile_${tag}_eager.txt 2>&1; head -16 $R/profile_${tag}_eager.txt
    fi
  done
save; fi
if [[ $steps == *x* ]]; then
  for v in ${X_VARIANTS:-plain sync first noahead}; do  # sync: every launch waits for its kernel (a race vanishes)
    A=(--model-dir /tmp/awq2l); E=(); [ $v = first ] && A+=(--triton-first); [ $v = noahead ] && E=(LAYERSTREAM_COMPILE_AHEAD=0)
    [ $v = sync ] && E=(CUDA_LAUNCH_BLOCKING=1); [ $v = int8 ] && E=(LAYERSTREAM_INT8_X=1); [ $v = perturb ] && A+=(--perturb 8)
    env "${E[@]}" timeout $(left 130) python3 bench/quant_decode_check.py --kind awq "${A[@]}" > $R/decode_check_$v.txt 2>&1
    echo "check $v rc=$?"; grep -E "logits vs|recorded|DIFF|attention" $R/decode_check_$v.txt | head -30
  done
save; fi
if [[ $steps == *w* ]]; then
  timeout $(left 360) python3 bench/qgemv_sweep.py ${W_ARGS:-} --budget-s $(( $(left 360) - 60 )) --out $R/qgemv_sweep.json \
    > $R/qgemv_sweep.txt 2>&1; echo "sweep rc=$?"; cat $R/qgemv_sweep.txt | grep -v Warning | tail -6
save; fi
if [[ $steps == *b* ]]; then  # the served burst's passes without the server around them (same machine as s)
  timeout $(left 150) python3 bench/burst_probe.py --model $M --out $R/burst.json > $R/burst.txt 2>&1
  echo "burst rc=$?"; grep -v Warn $R/burst.txt | tail -6
save; fi
if [[ $steps == *s* ]]; then  # steps.jsonl: the server's passes (the all-resident run's follow, from step 1 again)
  S="--model $M --vram-budget 6GiB --max-batch 32 --max-context 2304 --step-log $R/steps.jsonl ${S_KV:-}"
  timeout $(left 400) python3 -m tools.bench_serve --serve "$S" --clients ${S_LEVELS:-1,4,16,32} --requests-per-client 1 \
    --prompt-tokens 128:2048 --max-tokens 128:256 ${S_RES---all-resident} --json $R/serve.json > $R/bench_serve.log 2>&1
  echo "serve rc=$?"; tail -14 $R/bench_serve.log
  C=server; [ -n "${S_RES---all-resident}" ] && C="server resident"
  for c in $C; do  # each level's TTFT against the passes (the all-resident server's log follows)
    python3 -m tools.ttft_breakdown $R/serve.json $R/steps.jsonl --config $c > $R/ttft_$c.txt 2>&1; head -24 $R/ttft_$c.txt
  done
save; fi
if [[ $steps == *n* ]]; then  # the intake pass's copies (issue 16's TTFT) and host prompt states (issue 14)
  for kv in ${N_KV:-paged slots}; do  # one process each: a second engine in a process plans with the first's kernels
    V=pump+piece8,pump+piece8+nopark,pump+piece8+nopack,pump+piece8,pump+piece8+nopark  # paged: parked in unused blocks or not, packed or not
    [ $kv = slots ] && V=pump+piece8,pump+piece8+nopark,pump+piece8,pump+piece8+nopark  # slots: parked states or not
    timeout $(left 110) python3 bench/intake_probe.py --model $M --variants $V \
      --profile '' --kv-cache $kv --out $R/intake_probe_$kv.json > $R/intake_probe_$kv.txt 2>&1
    echo "probe $kv rc=$?"; grep -v Warn $R/intake_probe_$kv.txt | tail -12
  done
  for b in ${N_TABLE-6GiB,full 4GiB}; do  # issue 14's table (N_TABLE= : none); the 4 GiB ratios against the all-resident run of the first
    timeout $(left 150) python3 -m tools.bench_prefill --model $M --budgets $b --tokens 2048,8192,16384,32768 \
      --out $R/prefill_table_${b%%,*}.json > $R/prefill_table_${b%%,*}.txt 2>&1; echo "prefill $b rc=$?"
    grep -v Warn $R/prefill_table_${b%%,*}.txt | tail -12
  done
  NE=(${N_ENV:-}); if [ ${#NE[@]} -gt 0 ]; then  # the 4 GiB prefill again under N_ENV's variables
    env "${NE[@]}" timeout $(left 60) python3 -m tools.bench_prefill --model $M --budgets 4GiB --tokens 8192,16384 \
      --out $R/prefill4g_env.json > $R/prefill4g_env.txt 2>&1; echo "prefill 4GiB ${NE[*]} rc=$?"; grep -v Warn $R/prefill4g_env.txt | tail -4
  fi
save; fi
if [[ $steps == *e* ]]; then  # GPU tests of session 15's work: parked states, packed slices in a warmed-up server
  timeout $(left 200) python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_prefill_host_states.py \
    tests/test_gpu_serving_warmup.py > $R/pytest_e.txt 2>&1; echo "pytest rc=$?"; tail -8 $R/pytest_e.txt
save; fi
if [[ $steps == *r* ]]; then  # the 1-client level's slow first pass: what a warmed-up server still compiles
  timeout $(left 150) python3 bench/first_request_probe.py --model $M --out $R/first_request.json \
    > $R/first_request.txt 2>&1; echo "first-request rc=$?"; grep -v Warn $R/first_request.txt | tail -30
save; fi
if [[ $steps == *J* ]]; then  # the decode group of a mixed pass through the decode graphs
  awq_7b
  T=(); for a in ${J_TRACE:-default}; do T+=(--trace-arm "$a"); done
  timeout $(left 260) python3 bench/mixed_probe.py --model /tmp/q7b-awq --rounds ${J_ROUNDS:-4} \
    --arms ${J_ARMS:-default,runner:graph_unit=0,runner:stack_packed=1} "${T[@]}" --trace-dir $R \
    --out $R/mixed.json > $R/mixed.txt 2>&1; echo "mixed probe rc=$?"
  grep -vE "^ |USDT" $R/mixed.txt | tail -40
save; fi
if [[ $steps == *W* ]]; then  # the graph unit's GPU tests (before the served arms, which depend on them)
  timeout $(left 120) python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_graph_unit.py \
    tests/test_gpu_graph_unit.py tests/test_gpu_serving.py > $R/pytest_graph_unit.txt 2>&1
  echo "pytest graph unit rc=$?"; tail -3 $R/pytest_graph_unit.txt
save; fi
if [[ $steps == *u* ]]; then  # the served levels on the packed int4 checkpoint
  awq_7b
  for arm in ${U_ARMS:-awq}; do  # TAG or TAG:VAR=VALUE[,VAR=VALUE]: the level served under those variables
    t=${arm%%:*}; A=(); V=(); rpc=${U_RPC:-1}; [[ $arm == *:* ]] && IFS=, read -ra A <<< "${arm#*:}"
    for v in "${A[@]}"; do [[ $v == U_RPC=* ]] && rpc=${v#U_RPC=} || V+=("$v"); done  # U_RPC=N: this arm's
    S="--model /tmp/q7b-awq --vram-budget 6GiB --max-batch 32 --max-context 2304 --step-log $R/steps_$t.jsonl"
    env "${V[@]}" ${U_PROFILE:+LAYERSTREAM_PROFILE_PASSES=$R/passprof:$U_PROFILE} timeout $(left 400) python3 -m tools.bench_serve \
      --serve "$S" --clients ${U_LEVELS:-1,4,16,32} --requests-per-client $rpc \
      --prompt-tokens 128:2048 --max-tokens 128:256 --json $R/serve_$t.json --server-log $R/server_$t.log > $R/bench_serve_$t.log 2>&1
    echo "serve $t (${V[*]}, $rpc a client) rc=$?"; tail -8 $R/bench_serve_$t.log; grep -v Warn $R/server_$t.log | tail -12
    python3 -m tools.ttft_breakdown $R/serve_$t.json $R/steps_$t.jsonl --config server > $R/ttft_$t.txt 2>&1; head -24 $R/ttft_$t.txt
    python3 bench/mixed_passes.py $R/steps_$t.jsonl | tee $R/mixed_passes_$t.txt
    python3 bench/pass_costs.py $R/steps_$t.jsonl | tee $R/pass_costs_$t.txt
    save
  done
save; fi
if [[ $steps == *g* ]]; then  # issue 16: the AWQ served with its outputs held (the default) and not, one machine
  awq_7b
  for h in 1 0; do
    S="--model /tmp/q7b-awq --vram-budget 6GiB --max-batch 32 --max-context 2304 --step-log $R/steps_hold$h.jsonl"
    LAYERSTREAM_HOLD_OUTPUTS=$h timeout $(left 200) python3 -m tools.bench_serve --serve "$S" --clients 1,16 \
      --requests-per-client 1 --prompt-tokens 128:2048 --max-tokens 128:256 --json $R/serve_hold$h.json \
      > $R/bench_serve_hold$h.log 2>&1; echo "serve hold $h rc=$?"; grep "clients:" $R/bench_serve_hold$h.log
  done
save; fi
if [[ $steps == *d* ]]; then  # the served decode steps in process, 1 and 16 sequences: times, profile, copy-engine gaps
  awq_7b
  timeout $(left 200) python3 bench/decode_step_probe.py --model /tmp/q7b-awq --out $R > $R/decode_probe.txt 2>&1
  echo "probe rc=$?"; grep -v -E "Warn|USDT|warn" $R/decode_probe.txt | cut -c1-400 | tail -20
save; fi
if [[ $steps == *z* ]]; then
  awq_7b
  timeout $(left 400) python3 bench/nonfinite_probe.py --model /tmp/q7b-awq --dtype ${Z_DTYPE:-auto} \
    --out $R/nonfinite.json > $R/nonfinite.txt 2>&1; echo "nonfinite rc=$?"; grep -v Warn $R/nonfinite.txt | tail -16
save; fi
if [[ $steps == *y* ]]; then  # a served burst's pass, AWQ against bf16: where its time goes
  awq_7b
  for pm in ${Y_RUNS:-awq:/tmp/q7b-awq:1 awq-unstacked:/tmp/q7b-awq:0 bf16:$M:1}; do set -- ${pm//:/ }
    [ $1 = bf16 ] && synth_7b $M
    LAYERSTREAM_STACK_PROMPTS=$3 timeout $(left 220) python3 bench/burst_probe.py --model $2 --rounds 1 --profile ${Y_ARGS:-} \
      --out $R/burst_$1.json > $R/burst_$1.txt 2>&1; echo "burst $1 rc=$?"; grep -v Warn $R/burst_$1.txt | head -${Y_HEAD:-22}
  done
save; fi
if [[ $steps == *j* ]]; then  # the dense tile's size: prompt-pass launches against resident layers
  awq_7b; n=0
  for sz in ${J_SIZES:-64MiB 512MiB 64MiB 512MiB}; do n=$((n+1))  # auto: the planner's tile (variable unset)
    export LAYERSTREAM_DEQUANT_SCRATCH=$sz; [ $sz = auto ] && unset LAYERSTREAM_DEQUANT_SCRATCH
    timeout $(left 180) python3 bench/burst_probe.py --model /tmp/q7b-awq --rounds 2 --out $R/burst_tile$n-$sz.json \
      > $R/burst_tile$n-$sz.txt 2>&1; echo "burst tile $sz rc=$?"; grep -E "round|plan:" $R/burst_tile$n-$sz.txt
    timeout $(left 90) python3 -m tools.bench_stream --model /tmp/q7b-awq --budgets 6GiB \
      --batches 1 --steps 8 --prefill-tokens 0 --out-dir $R --tag tile$n-$sz > $R/stream_tile$n-$sz.log 2>&1
    echo "decode tile $sz rc=$?"; tail -2 $R/stream_tile$n-$sz.log
  done; unset LAYERSTREAM_DEQUANT_SCRATCH
save; fi
if [[ $steps == *E* ]]; then  # the int8-x GEMV's code layouts
  timeout $(left 150) python3 bench/probe_epilogue.py --out $R/epilogue2.json > $R/epilogue2.txt 2>&1
  echo "epilogue rc=$?"; tail -12 $R/epilogue2.txt; save
  for v in "1 0" "0 0" "0 1"; do set -- $v
    LAYERSTREAM_I8_WORDS2D=$1 LAYERSTREAM_I8_TRANS=$2 timeout $(left 70) python3 bench/probe_qkernels.py --batches 1 \
      --ggml '' --out $R/probe_m1_w$1t$2.json > $R/probe_m1_w$1t$2.txt 2>&1
    echo "qkernels words2d=$1 trans=$2 rc=$?"; grep -E "i8x" $R/probe_m1_w$1t$2.txt
  done
save; fi
if [[ $steps == *H* ]]; then  # the int4 host layer next to copies
  timeout $(left 120) python3 bench/probe_int4_layer_rate.py --contend --profile > $R/int4_layer.txt 2>&1
  echo "int4 layer rc=$?"; cat $R/int4_layer.txt
save; fi
if [[ $steps == *M* ]]; then  # why the bf16 lane read 3.5x slower beside copies than alone
  for b in 1 4; do timeout $(left 120) python3 bench/probe_lane_memory.py --batch $b > $R/lane_memory_b$b.txt 2>&1
    echo "lane memory b$b rc=$?"; cat $R/lane_memory_b$b.txt; done
save; fi
if [[ $steps == *A* ]]; then  # the AWQ host lane planned twice: the second from the first's achieved rate
  awq_7b
  timeout $(left 240) python3 -m tools.bench_stream --model /tmp/q7b-awq --budgets 3GiB,4GiB --batches 1 --steps 8 \
    --prefill-tokens 0 --host-compute off,auto,auto --out-dir $R --tag hostlane-awq2 > $R/bench_hostlane_awq2.log 2>&1
  echo "hostlane awq rc=$?"; grep -E "GiB|host" $R/bench_hostlane_awq2.log | tail -12
  python3 -m tools.lane_trace $R --tag hostlane-awq2 --bus 2>&1 | tee $R/lane_trace_awq.txt
save; fi
if [[ $steps == *T* ]]; then  # why one run's host lane took 2-3x another's with the same plan: threads, steal
  awq_7b
  for arm in ${T_ARMS:-base passive}; do  # passive: OpenMP threads sleep at once when idle (no spinning)
    E=(); [ $arm = passive ] && E=(OMP_WAIT_POLICY=PASSIVE)
    env "${E[@]}" timeout $(left 120) python3 bench/thread_sampler.py --out $R/threads_awq_$arm.txt --window 0.1 --top 8 -- \
      python3 -m tools.bench_stream --model /tmp/q7b-awq --budgets 4GiB --batches 1 --steps 16 --prefill-tokens 0 \
      --host-compute off,auto,auto,auto,auto --out-dir $R --tag noise-awq-$arm > $R/bench_noise_awq_$arm.log 2>&1
    echo "noise awq $arm rc=$?"; grep -E "GiB.*host" $R/bench_noise_awq_$arm.log
    env "${E[@]}" timeout $(left 80) python3 bench/thread_sampler.py --out $R/threads_bf16_$arm.txt --window 0.1 --top 8 -- \
      python3 -m tools.bench_stream --model $M --budgets 6GiB --batches 1 --steps 12 --prefill-tokens 0 \
      --host-compute auto,auto,auto --out-dir $R --tag noise-bf16-$arm > $R/bench_noise_bf16_$arm.log 2>&1
    echo "noise bf16 $arm rc=$?"; grep -E "GiB.*host" $R/bench_noise_bf16_$arm.log
  done
save; fi
if [[ $steps == *N* ]]; then  # does the lane's read rate depend on which buffer it reads (the VM's memory placement)?
  timeout $(left 150) python3 bench/probe_mem_placement.py --buffers 24 --mib 1024 --passes 3 > $R/mem_placement_plain.txt 2>&1
  echo "placement plain rc=$?"; cat $R/mem_placement_plain.txt
  timeout $(left 120) python3 bench/probe_mem_placement.py --buffers 16 --mib 1024 --passes 3 --pinned > $R/mem_placement_pinned.txt 2>&1
  echo "placement pinned rc=$?"; cat $R/mem_placement_pinned.txt
save; fi
if [[ $steps == *L* ]]; then  # did the host-rate measurement's 256 MiB weight read the hosts' 300 MiB L3?
  timeout $(left 90) python3 bench/probe_llc_rate.py > $R/llc_rate.txt 2>&1; echo "llc rate rc=$?"; cat $R/llc_rate.txt
save; fi
if [[ $steps == *G* ]]; then  # the host lane's guard retiring a lane planned from a lying rate
  G="--model $M --vram-budget 6GB --max-new-tokens 48 --no-chat --prompt 'The history of the printing press'"
  for run in off auto lie again; do
    hc=auto; [ $run = off ] && hc=off
    [ $run = lie ] && python3 bench/lie_host_rate.py --scale 4 > $R/guard_lie_rates.txt 2>&1
    eval timeout $(left 100) python3 -m engine.run $G --host-compute $hc -v > $R/guard_$run.txt 2>&1
    echo "guard $run rc=$?"; [ $run = again ] && python3 bench/lie_host_rate.py --restore
    grep -E "^plan:|host lane|tok/s" $R/guard_$run.txt | head -6
  done
save; fi
if [[ $steps == *R* ]]; then  # why a run decoded at 2.17 tok/s after its lane's retirement (streaming alone: 4.84)
  timeout $(left 60) python3 -m engine.run --model $M --vram-budget 6GB --max-new-tokens 4 --no-chat --prompt hi \
    > $R/guard_measure.txt 2>&1  # measures and caches the host rates on a fresh machine
  python3 bench/lie_host_rate.py --scale 4 > $R/guard_lie_rates.txt 2>&1
  timeout $(left 200) python3 bench/guard_probe.py --model $M --vram-budget 6GB --tokens 40 \
    > $R/guard_probe.txt 2>&1; echo "guard probe rc=$?"; python3 bench/lie_host_rate.py --restore
  grep -vE "^\s*$|loading weights" $R/guard_probe.txt | tail -14
  timeout $(left 120) python3 -m pytest -q -p no:cacheprovider tests/test_lane_guard.py > $R/pytest_guard.txt 2>&1
  echo "pytest rc=$?"; tail -3 $R/pytest_guard.txt
save; fi
if [[ $steps == *K* ]]; then  # the guard under another tenant's memory traffic
  G="--model $M --vram-budget 6GB --max-new-tokens 48 --no-chat --prompt 'The history of the printing press' -v"
  python3 bench/mem_hog.py --threads 12 --seconds 140 > $R/mem_hog.txt 2>&1 & HOG=$!; sleep 3
  for hc in auto off; do
    eval timeout $(left 80) python3 -m engine.run $G --host-compute $hc > $R/guard_hog_$hc.txt 2>&1; echo "$hc rc=$?"
    grep -E "^plan:|host lane|finish" $R/guard_hog_$hc.txt | cut -c1-330
  done; kill $HOG
  timeout $(left 150) python3 -m pytest -q -p no:cacheprovider tests/test_lane_guard.py tests/test_compile_ahead.py \
    > $R/pytest_guard_ahead.txt 2>&1; echo "pytest rc=$?"; tail -3 $R/pytest_guard_ahead.txt
save; fi
if [[ $steps == *F* ]]; then  # a first run with the host lane's measurements in it
  timeout $(left 100) python3 -m tools.bench_startup --model $M --vram-budget 6GB --runs first,cached \
    --triton-cache fresh --cache-dir /tmp/ls-F --timeout 90 --out $R/startup_F.json > $R/startup_F.txt 2>&1
  cat $R/startup_F.txt
save; fi
if [[ $steps == *Q* ]]; then  # o_proj's rounding in the attention's epilogue, timed
  awq_7b
  if [ "${Q_TESTS:-1}" = 1 ]; then  # Q_TESTS=0: the timing alone
  LAYERSTREAM_ROUND_IN_ATTENTION=1 timeout $(left 150) python3 -m pytest -q -p no:cacheprovider \
    tests/test_kernels_attention_decode_round.py tests/test_kernels_qgemv_i8_fused.py > $R/pytest_round.txt 2>&1
  echo "pytest rc=$?"; tail -3 $R/pytest_round.txt
  LAYERSTREAM_ROUND_IN_ATTENTION=1 timeout $(left 90) python3 bench/round_check.py --model /tmp/q7b-awq \
    --vram-budget 6GiB > $R/round_check.txt 2>&1; echo "round_check rc=$?"; tail -2 $R/round_check.txt
  fi  # Q_ORDER: the arms, alternated; Q_STEPS: decode steps timed a run (16 steps ran 386-448 tok/s in one arm, s45)
  n=0; for r in ${Q_ORDER:-0 1 0 1}; do n=$((n+1))
    LAYERSTREAM_ROUND_IN_ATTENTION=$r timeout $(left 90) python3 -m tools.bench_stream --model /tmp/q7b-awq \
      --budgets 6GiB --batches 1 --steps ${Q_STEPS:-16} --prefill-tokens 0 --out-dir $R --tag round$r-$n > $R/bench_round$r-$n.log 2>&1
    echo "round=$r ($n) rc=$?"; grep -E "tok/s|ms" $R/bench_round$r-$n.log | tail -2
  done
save; fi
if [[ $steps == *B* ]]; then  # is the AWQ burst's first pass host-bound or device-bound?
  awq_7b
  timeout $(left 240) python3 bench/burst_probe.py --model /tmp/q7b-awq --rounds 2 --trace $R/trace_awq.json.gz \
    --out $R/burst_trace_awq.json > $R/burst_trace_awq.txt 2>&1; echo "burst awq rc=$?"
  grep -E "^round|traced|compute stream|gaps before" $R/burst_trace_awq.txt | head -24
  if [ -n "${B_BF16:-}" ]; then synth_7b $M
    timeout $(left 200) python3 bench/burst_probe.py --model $M --rounds 2 --trace $R/trace_bf16.json.gz \
      --out $R/burst_trace_bf16.json > $R/burst_trace_bf16.txt 2>&1; echo "burst bf16 rc=$?"
    grep -E "^round|traced|compute stream|gaps before" $R/burst_trace_bf16.txt | head -24; fi
save; fi
if [[ $steps == *X* ]]; then  # the burst's passes: prompt slices filling the stacks, direct launches
  awq_7b
  [[ "${X_ORDER:-fast}" == *fast* ]] && { LAYERSTREAM_FAST_LAUNCH=1 timeout $(left 90) python3 -m pytest -q \
    -p no:cacheprovider tests/test_fastlaunch.py > $R/pytest_fastlaunch.txt 2>&1; tail -2 $R/pytest_fastlaunch.txt; }
  n=0; for arm in ${X_ORDER:-nofill fill fast nofill fill fast prof}; do n=$((n+1))
    case $arm in nofill) E=LAYERSTREAM_FILL_STACKS=0;; fast) E=LAYERSTREAM_FAST_LAUNCH=1;;
      varlen) E=LAYERSTREAM_VARLEN_PREFILL=1;; *) E=;; esac
    P=; [ $arm = prof ] && P=--cprofile  # the defaults, one more burst's first pass under cProfile
    env $E timeout $(left 100) python3 bench/burst_probe.py --model /tmp/q7b-awq --rounds 2 $P \
      --out $R/burst_$n$arm.json > $R/burst_$n$arm.txt 2>&1; echo "$arm ($n, $E) rc=$?"
    grep -E "^round|^fastlaunch" $R/burst_$n$arm.txt | cut -c1-120
  done
save; fi
if [[ $steps == *V* ]]; then  # stacked prompt slices in one launch each (engine/varlen.py): GPU tests, burst, served
  awq_7b
  timeout $(left 150) python3 -m pytest -q -p no:cacheprovider tests/test_kernels_varlen_prefill.py \
    tests/test_varlen_stacked.py > $R/pytest_varlen.txt 2>&1; echo "pytest rc=$?"; tail -2 $R/pytest_varlen.txt
  n=0; for v in 0 1 0 1; do n=$((n+1))
    LAYERSTREAM_VARLEN_PREFILL=$v timeout $(left 100) python3 bench/burst_probe.py --model /tmp/q7b-awq --rounds 2 \
      --out $R/burst_$n-varlen$v.json > $R/burst_$n-varlen$v.txt 2>&1; echo "varlen=$v ($n) rc=$?"
    grep -E "^round" $R/burst_$n-varlen$v.txt | cut -c1-120
  done
  for v in 1 0; do cold_burst varlen$v LAYERSTREAM_VARLEN_PREFILL=$v; done  # TTFT, no kernel built while serving
save; fi
if [[ $steps == *S* ]]; then  # issue 16: the burst's passes with units of more rows (LAYERSTREAM_STACK_ROWS), the bound
  awq_7b                      # on what one unit a pass (no repeated dequantization and GEMMs a unit) gains
  [ -n "${S_TESTS:-}" ] && { timeout $(left 200) python3 -m pytest -q -p no:cacheprovider tests/test_mlp_chunks.py \
    tests/test_kernels_gemm.py tests/test_kernels_qdequant.py -k "sum_k or adds_acc or overlapping or column_slice or \
    pieces" > $R/pytest_pieces.txt 2>&1; echo "pytest rc=$?"; tail -2 $R/pytest_pieces.txt; }
  n=0; for arm in ${S_ORDER:-6:0 9:0 9:16384 9:0 9:16384}; do n=$((n+1)); IFS=: read -r b r p <<< "$arm"
    E=(); [ "$r" != 0 ] && E+=(LAYERSTREAM_STACK_ROWS=$r); [ -n "$p" ] && E+=(LAYERSTREAM_MLP_PIECES=$p)
    env "${E[@]}" timeout $(left 120) python3 bench/burst_probe.py --model /tmp/q7b-awq --vram-budget ${b}GiB \
      --rounds 3 --out $R/burst_$n-${b}g-$r-$p.json > $R/burst_$n-${b}g-$r-$p.txt 2>&1
    echo "${b}GiB stack $r pieces ${p:-auto} ($n) rc=$?"
    grep -E "^plan|^round|Error|peak" $R/burst_$n-${b}g-$r-$p.txt | cut -c1-120
  done
save; fi
if [[ $steps == *I* ]]; then  # issue 16: a pass's prompts as one unit (their MLP in pieces) against chunk units
  awq_7b
  n=0; for r in ${I_ORDER:-pieces chunk pieces}; do n=$((n+1))  # the in-process burst
    E=(LAYERSTREAM_STACK_PIECES=0); [ "$r" = pieces ] && E=(LAYERSTREAM_STACK_PIECES=1)
    env "${E[@]}" timeout $(left 110) python3 bench/burst_probe.py --model /tmp/q7b-awq --rounds 2 \
      --out $R/burst_$n-$r.json > $R/burst_$n-$r.txt 2>&1; echo "burst $r rc=$?"
    grep -E "^warm|^round|out of device" $R/burst_$n-$r.txt | cut -c1-120
  done
  for r in ${I_SERVE:-pieces chunk}; do  # the served cold burst
    cold_burst $r LAYERSTREAM_STACK_PIECES=$([ "$r" = pieces ] && echo 1 || echo 0)
  done
save; fi
if [[ $steps == *C* ]]; then  # issue 16: prompt units through captured graphs against eager units of one chunk
  awq_7b
  [ "${C_TESTS:-1}" = 1 ] && { timeout $(left 240) python3 -m pytest -q -p no:cacheprovider tests/test_prompt_graphs.py tests/test_kernels_varlen_prefill.py \
    > $R/pytest_pgraphs.txt 2>&1; echo "pytest rc=$?"; tail -3 $R/pytest_pgraphs.txt; }
  for b in ${C_BUDGETS-7GiB}; do
    LAYERSTREAM_PROMPT_GRAPHS=1 timeout $(left 170) python3 bench/unit_ab.py --model /tmp/q7b-awq --vram-budget $b \
      --max-batch 32 --max-context 2304 --rounds ${C_ROUNDS:-3} --arms chunk,graphs --out $R/unit_ab_$b.json \
      > $R/unit_ab_$b.txt 2>&1; echo "unit_ab $b rc=$?"
    grep -E "^warm|^prompt graphs|^round|^tokens|Error|error" $R/unit_ab_$b.txt | cut -c1-150
    grep -q "^prompt graphs: none" $R/unit_ab_$b.txt && C_BUDGETS= && [ -n "${C_WIDER:-}" ] && { b=$C_WIDER
      LAYERSTREAM_PROMPT_GRAPHS=1 timeout $(left 170) python3 bench/unit_ab.py --model /tmp/q7b-awq --vram-budget $b \
        --max-batch 32 --max-context 2304 --rounds ${C_ROUNDS:-3} --arms chunk,graphs --out $R/unit_ab_$b.json \
        > $R/unit_ab_$b.txt 2>&1; echo "unit_ab $b (no graphs at the first budget) rc=$?"
      grep -E "^warm|^prompt graphs|^round|^tokens|Error|error" $R/unit_ab_$b.txt | cut -c1-150; }
  done
  n=0; for e in ${C_GRAPHS_ONLY:-}; do n=$((n+1))  # graphs-only processes, e.g. LAYERSTREAM_MLP_PIECES=3
    env LAYERSTREAM_PROMPT_GRAPHS=1 ${e//+/ } timeout $(left 120) python3 bench/unit_ab.py --model /tmp/q7b-awq \
      --vram-budget 6GiB --max-batch 32 --max-context 2304 --rounds 3 --arms graphs --out $R/graphs_$n.json \
      > $R/graphs_$n.txt 2>&1; echo "graphs only, $e rc=$?"
    grep -E "^warm|^prompt graphs|^round|Error|error" $R/graphs_$n.txt | cut -c1-150
    grep -c "out of device memory" $R/graphs_$n.txt
  done
  for r in ${C_SERVE-graphs chunk}; do
    cold_burst $r LAYERSTREAM_PROMPT_GRAPHS=$([ "$r" = graphs ] && echo 1 || echo 0)
    grep -hE "prompt graphs|warm-up:" $R/bench_serve_$r.log | head -3
  done
save; fi
if [[ $steps == *D* ]]; then  # issue 16: the lm_head copied ahead into lent buffers against the ring alone
  awq_7b
  [ "${D_TESTS:-1}" = 1 ] && { timeout $(left 90) python3 -m pytest -q -p no:cacheprovider tests/test_head_ahead.py \
    tests/test_dense_layer.py tests/test_serving_oom_retry.py > $R/pytest_ahead.txt 2>&1; echo "pytest rc=$?"; tail -3 $R/pytest_ahead.txt; }
  [ -n "${D_ARMS-x}" ] && timeout $(left 150) python3 bench/unit_ab.py --model /tmp/q7b-awq --vram-budget 6GiB --max-batch 32 \
    --max-context 2304 --rounds ${D_ROUNDS:-3} --arms ${D_ARMS:-chunk,ahead,dense,both} --out $R/unit_ab_ahead.json \
    > $R/unit_ab_ahead.txt 2>&1; echo "unit_ab rc=$?"
  grep -E "^warm|^room|^round|^tokens|Error|error" $R/unit_ab_ahead.txt | cut -c1-160
  for r in ${D_SERVE-both chunk}; do  # arms: chunk (neither), ahead, dense, both, default (no variable set)
    head=$([[ $r == ahead || $r == both ]] && echo 1 || echo 0); dense=$([[ $r == dense || $r == both ]] && echo 1 || echo 0)
    t=$r; n=2; while [ -e $R/serve_$t.json ]; do t=$r$n; n=$((n + 1)); done  # an arm named again: its own files
    if [ "$r" = default ]; then cold_burst $t; else cold_burst $t LAYERSTREAM_HEAD_AHEAD=$head LAYERSTREAM_DENSE_LAYER=$dense; fi
    python3 -c "import json,sys; r=[json.loads(l) for l in open(sys.argv[1])]; print('lm_head chunks lent:', sum(x.get('lent', 0) for x in r), 'in', sum(1 for x in r if x.get('lent')), 'passes; weights widened once a layer:', sum(x.get('widened', 0) for x in r))" $R/steps_$t.jsonl
  done
save; fi
if [[ $steps == *c* ]]; then  # the accelerate peer (loading the 7B offloaded takes minutes): its own step
  S="--model $M --vram-budget 6GiB --max-batch 32 --max-context 2304"
  timeout $(left 400) python3 -m tools.bench_serve --serve "$S" --clients 1 --requests-per-client 1 \
    --prompt-tokens 128:2048 --max-tokens 128:256 --peer-accelerate 6GiB --peer-time-limit 60 \
    --json $R/serve_peer.json > $R/bench_serve_peer.log 2>&1
  echo "peer rc=$?"; tail -4 $R/bench_serve_peer.log
save; fi
mkdir -p $R/tuning && cp /tmp/ls-*/tuning/*.json $R/tuning/ 2>/dev/null
# the default cache's picks too (the server's warm-up tunes the served shapes there; kernels.tuning_defaults.export
# ships them): the H100's shipped file had no served AWQ shapes, and a fresh machine's warm-up took 69 s (s44 call8)
mkdir -p $R/tuning-default && cp "${LAYERSTREAM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/layerstream}"/tuning/*.json \
  $R/tuning-default/ 2>/dev/null
save
