#!/usr/bin/env bash
# Prepare the llama.cpp source that the GPU run builds, HERE (the device has no network).
#
#     bench/llama_cpp/prepare_source.sh [VERSION]      # default: the newest llama-cpp-python
#
# The source is the one the llama-cpp-python sdist on PyPI bundles (vendor/llama.cpp), so the
# benchmarked llama.cpp is named by a PyPI version as well as by a commit. The sdist is 77 MB,
# over the 64 MiB that a device run can carry, so this keeps only what a CUDA/CPU build of
# llama-bench and llama-quantize needs (no models, docs, tests, examples, web UI, server, or
# other GPU backends) and packs it as .llama_cpp/carry/llama.cpp-src.tar.gz (about 10 MB),
# with gguf-py (the GGUF writer) and VERSION.json (sdist version, commit, commit date).
# .llama_cpp/ is git-ignored through .git/info/exclude; run_on_gpu.sh unpacks the tarball.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
version="${1:-}"
root=.llama_cpp
grep -qx '/.llama_cpp/' .git/info/exclude || echo '/.llama_cpp/' >>.git/info/exclude
mkdir -p "$root/carry"

sdist=$(ls "$root"/llama_cpp_python-${version:-*}.tar.gz 2>/dev/null | sort -V | tail -1 || true)
if [[ -z "$sdist" ]]; then
    python3 -m pip download --no-deps --no-binary :all: -d "$root" "llama-cpp-python${version:+==$version}"
    sdist=$(ls "$root"/llama_cpp_python-*.tar.gz | sort -V | tail -1)
fi
name=$(basename "$sdist" .tar.gz)
[[ -d "$root/$name" ]] || tar -xzf "$sdist" -C "$root"
upstream="$root/$name/vendor/llama.cpp"
gitdir="$root/$name/.git/modules/vendor/llama.cpp"

stage=$(mktemp -d "$root/stage.XXXX")
trap 'rm -rf "$stage"' EXIT
# Everything but what the build never reads; ggml's other backends are added only when enabled.
tar -C "$upstream" -cf - \
    --exclude=./.git --exclude=./.github --exclude=./.devops --exclude=./models --exclude=./docs \
    --exclude=./media --exclude=./tests --exclude=./benches --exclude=./examples --exclude=./pocs \
    --exclude=./app --exclude=./conversion --exclude='./convert_*.py' --exclude=./tools/ui \
    --exclude=./tools/server --exclude=./ggml/tests --exclude=./ggml/examples \
    --exclude=./ggml/src/ggml-cann --exclude=./ggml/src/ggml-et --exclude=./ggml/src/ggml-hexagon \
    --exclude=./ggml/src/ggml-hip --exclude=./ggml/src/ggml-metal --exclude=./ggml/src/ggml-musa \
    --exclude=./ggml/src/ggml-opencl --exclude=./ggml/src/ggml-openvino --exclude=./ggml/src/ggml-sycl \
    --exclude=./ggml/src/ggml-virtgpu --exclude=./ggml/src/ggml-vulkan --exclude=./ggml/src/ggml-webgpu \
    --exclude=./ggml/src/ggml-zdnn --exclude=./ggml/src/ggml-zendnn \
    . | tar -C "$stage" --one-top-level=llama.cpp -xf -

commit=unknown
date=unknown
if [[ -d "$gitdir" ]]; then
    commit=$(git --git-dir "$gitdir" rev-parse HEAD)
    date=$(git --git-dir "$gitdir" log -1 --format=%cI)
fi
# The sdist's llama.cpp is a shallow clone, so its upstream build number (tag bNNNN, what
# llama-bench reports as build_number) cannot be counted here; known ones, from public
# references to the tag (llama-cpp-python 0.3.36 bundles b11312):
case "$commit" in
    0c1e57098bba43ac29e6e3b677cdceebdd22334f) number=11312 ;;
    *) number=null ;;
esac
sdist_version=${name#llama_cpp_python-}
cat >"$stage/llama.cpp/VERSION.json" <<EOF
{
  "source": "llama-cpp-python $sdist_version sdist from PyPI, vendor/llama.cpp",
  "llama_cpp_python_version": "$sdist_version",
  "llama_cpp_commit": "$commit",
  "llama_cpp_commit_date": "$date",
  "llama_cpp_build_number": $number,
  "build_number_source": "upstream tag b<number> of this commit, from public references (prepare_source.sh); null: unknown"
}
EOF
tar -C "$stage" -czf "$root/carry/llama.cpp-src.tar.gz" llama.cpp
du -sh "$stage/llama.cpp" "$root/carry/llama.cpp-src.tar.gz"
cat "$stage/llama.cpp/VERSION.json"
