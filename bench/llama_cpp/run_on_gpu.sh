#!/usr/bin/env bash
# llama.cpp on the GPU machine, in one device call: build, write GGUFs, llama-bench, merge.
#
#     bench/llama_cpp/run_on_gpu.sh          # from the repo root; carry .llama_cpp/carry
#
# Before: bench/llama_cpp/prepare_source.sh here (the device has no network), which packs the
# llama.cpp source of the llama-cpp-python sdist as .llama_cpp/carry/llama.cpp-src.tar.gz.
# After: python3 bench/llama_cpp/merge_results.py <the files that came back> (merges them into
# bench/results/engine-H200.json here).
#
# Steps, each with a timestamp (the call has 600 s in all):
#   1. unpack the source to /tmp and configure a CUDA build for sm_90 only, Release, ninja;
#   2. build llama-bench and llama-quantize in the background (-j16, about 5 minutes) WHILE
#      make_gguf.py writes random-weight Q4_0 and Q4_K_M GGUFs of our two architectures
#      directly (about 11 GB; no F16 file, no llama-quantize pass: see make_gguf.py);
#   3. llama-bench for each file, -ngl 99, flash attention off and on (-fa 0,1): prefill of
#      623 tokens (-p 623 -n 0, ubatch 512 (default) and 1024), and 128 decoded tokens after
#      0 and after 623 tokens of context (-n 128 -d 0,623; ours decodes after a 623-token prompt);
#      JSON lines, appended as each test ends, so a cut-off run keeps what it measured;
#   4. merge_results.py: summary.json and a merged copy of engine-H200.json.
# Files under $OUT: run.log, build.log, gguf_info.json, VERSION.json, llama_bench.jsonl,
# summary.json, engine-H200.json.
#
# Variables: OUT (required), REPS (llama-bench repetitions, 5), BUDGET_S (570), ARCHS (llava-1.5-7b,llava-2.7b;
# "tiny" for a local check), JOBS (16), LLAMA_CPP_CUDA (ON; OFF builds for the CPU, a local
# check), LLAMA_CPP_WORK (/tmp/llama_cpp_bench), LLAMA_CPP_BUILD_DIR ($LLAMA_CPP_WORK/build).
set -uo pipefail
out=${OUT:?set OUT to the folder for the results}
repo=$(pwd)
work=${LLAMA_CPP_WORK:-/tmp/llama_cpp_bench}
build=${LLAMA_CPP_BUILD_DIR:-$work/build}
cuda=${LLAMA_CPP_CUDA:-ON}
jobs=${JOBS:-16}
reps=${REPS:-5}
budget=${BUDGET_S:-570} # seconds from the start after which no llama-bench starts
archs=${ARCHS:-llava-1.5-7b,llava-2.7b}
tarball=$repo/.llama_cpp/carry/llama.cpp-src.tar.gz
mkdir -p "$out" "$work/models"
exec > >(tee -a "$out/run.log") 2>&1
stamp() { echo "[$(date +%T) +${SECONDS}s] $*"; }

stamp "start: $(hostname), $(nproc) cores; archs $archs; CUDA $cuda"
[[ -f "$tarball" ]] || { stamp "FATAL: no $tarball (run bench/llama_cpp/prepare_source.sh and carry .llama_cpp/carry)"; exit 1; }
nvidia-smi -L 2>&1 || true
command -v nvcc >/dev/null && nvcc --version | tail -2
cmake --version | head -1
df -h "$work" | tail -1

# ---- 1. source and configure ----------------------------------------------------------------
stamp "unpack"
tar -xzf "$tarball" -C "$work"
src=$work/llama.cpp
cp "$src/VERSION.json" "$out/VERSION.json"
commit=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['llama_cpp_commit'][:9])" "$src/VERSION.json")
number=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['llama_cpp_build_number'] or 0)" "$src/VERSION.json")
flags=(-G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF
       -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF
       "-DLLAMA_BUILD_COMMIT=$commit" "-DLLAMA_BUILD_NUMBER=$number")
if [[ "$cuda" == ON ]]; then
    flags+=(-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90)
else
    flags+=(-DGGML_CUDA=OFF)
fi

configure() { cmake -S "$src" -B "$build" "${flags[@]}" "$@" >>"$out/build.log" 2>&1; }

stamp "configure"
if ! configure; then
    # A toolkit assembled from pip wheels can lack cuBLAS, which ggml-cuda links: use the
    # nvidia-cublas wheel that PyTorch brings.
    stamp "configure failed ($(grep -m1 -o 'CUDA::[a-zA-Z]*' "$out/build.log" || echo see build.log)); looking for cuBLAS in Python's nvidia packages"
    lib=$(python3 - <<'EOF'
import glob, sys
for root in sys.path:
    hits = sorted(glob.glob(f"{root}/nvidia/**/libcublas.so*", recursive=True))
    if hits:
        print(hits[0].rsplit("/", 1)[0])
        break
EOF
)
    configured=no
    if [[ -n "$lib" ]]; then
        inc=$(dirname "$lib")/include
        stamp "cuBLAS in $lib"
        ls "$lib" "$inc" 2>&1 | head -20
        blas=$(ls "$lib"/libcublas.so* | head -1)
        blaslt=$(ls "$lib"/libcublasLt.so* | head -1)
        rm -f "$build/CMakeCache.txt"
        configure "-DCUDA_cublas_LIBRARY=$blas" "-DCUDA_cublasLt_LIBRARY=$blaslt" \
            "-DCMAKE_CUDA_FLAGS=-I$inc" "-DCMAKE_CXX_FLAGS=-I$inc" "-DCMAKE_EXE_LINKER_FLAGS=-Wl,-rpath,$lib" \
            && configured=yes
    fi
    [[ $configured == yes ]] || { stamp "FATAL: configure failed"; tail -40 "$out/build.log"; exit 1; }
fi
grep -E "CUDA Toolkit|CUDA host compiler|Including CUDA|CMAKE_CUDA_ARCHITECTURES" "$out/build.log" || true

# ---- 2. build in the background, GGUFs meanwhile ----------------------------------------------
stamp "build llama-bench llama-quantize (-j$jobs) in the background"
(ninja -C "$build" -j"$jobs" llama-bench llama-quantize >>"$out/build.log" 2>&1; echo "ninja exit $?" >>"$out/build.log") &
builder=$!

stamp "write GGUFs"
PYTHONPATH=$src/gguf-py${PYTHONPATH:+:$PYTHONPATH} nice -n 5 python3 "$repo/bench/llama_cpp/make_gguf.py" \
    --archs "$archs" --types q4_0,q4_k_m --out-dir "$work/models" --info "$out/gguf_info.json" \
    || { stamp "FATAL: make_gguf.py failed"; kill "$builder"; exit 1; }
stamp "GGUFs written; $(du -sh "$work/models" | cut -f1); waiting for the build"
wait "$builder"
stamp "build done: $(tail -1 "$out/build.log")"
bench=$build/bin/llama-bench
[[ -x "$bench" ]] || { stamp "FATAL: no $bench"; grep -m5 -B2 -A10 -E "error|FAILED" "$out/build.log"; tail -30 "$out/build.log"; exit 1; }
"$bench" --version 2>&1 | tail -3

# ---- 3. llama-bench -------------------------------------------------------------------------
merge() {
    python3 "$repo/bench/llama_cpp/merge_results.py" "$out" --engine "$repo/bench/results/engine-H200.json" \
        --out "$out/engine-H200.json" --summary "$out/summary.json" --no-markdown
}
# Each llama-bench gets at most 150 s and what is left of the budget, so that the merge below
# still runs inside the call's 600 s when the build took longer than planned.
bench_run() {
    local left=$((budget - SECONDS))
    ((left > 15)) || { stamp "skipped: ${left}s left of the ${budget}s budget"; return; }
    timeout $((left < 150 ? left : 150)) "$bench" "$@" -ngl 99 -fa 0,1 -r "$reps" -o jsonl \
        >>"$out/llama_bench.jsonl" || stamp "llama-bench exit $?"
}
IFS=, read -ra names <<<"$archs"
for name in "${names[@]}"; do
    for type in q4_0 q4_k_m; do
        model=$work/models/$name-$type.gguf
        stamp "llama-bench $name $type: prefill"
        bench_run -m "$model" -p 623 -n 0 -ub 512,1024
        stamp "llama-bench $name $type: decode"
        bench_run -m "$model" -p 0 -n 128 -d 0,623
        merge >/dev/null 2>&1 || true # keep a summary after each model, in case the call is cut off
    done
done

# ---- 4. merge -------------------------------------------------------------------------------
stamp "merge"
merge
stamp "done"
