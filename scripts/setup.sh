#!/usr/bin/env bash
# Set up nanovlm in a Python venv, from nothing but Python 3.10+, gcc and cmake:
#   ROS 2 Kilted from PyPI wheels, PyTorch, transformers, this package (editable), its ROS
#   interfaces built into the venv, and the embedded default model.
# Re-running it is quick: each step is skipped when its inputs have not changed.
#
#   NANOVLM_VENV   where the venv goes (default: .venv in the checkout)
#   TORCH_SPEC     the torch requirement (default torch==2.13.0, a CPU build on the dev machines)
set -eo pipefail
cd "$(dirname "$0")/.."
root=$PWD
venv=${NANOVLM_VENV:-$root/.venv}
torch_spec=${TORCH_SPEC:-torch==2.13.0}
python=${PYTHON:-python3}

step() { printf '\n== %s\n' "$*"; }

if [ ! -x "$venv/bin/python" ]; then
  step "creating $venv"
  "$python" -m venv "$venv"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"
pip_install() { python -m pip install --disable-pip-version-check -q "$@"; }

# One stamp per step: the hash of what the step depends on.
stamp_dir=$venv/.nanovlm-setup
mkdir -p "$stamp_dir"
changed() {  # changed NAME FILES... -> true when FILES differ from the last successful run
  local name=$1; shift
  local sum; sum=$(cat "$@" | sha256sum | cut -d' ' -f1)
  [ "$(cat "$stamp_dir/$name" 2>/dev/null)" != "$sum" ] && echo "$sum" > "$stamp_dir/$name.new"
}
done_step() { mv "$stamp_dir/$1.new" "$stamp_dir/$1"; }

echo "$torch_spec" > "$stamp_dir/torch-spec"
if changed python-packages requirements/*.txt setup.py "$stamp_dir/torch-spec"; then
  step "installing ROS 2 wheels, $torch_spec, transformers"
  pip_install --upgrade pip
  pip_install -r requirements/ros-kilted.txt
  # torch first and pinned: an unpinned torch pulled in by another package is a multi-GB CUDA build.
  pip_install "$torch_spec"
  pip_install -r requirements/engine.txt
  pip_install --no-deps -r requirements/demo-weights.txt
  pip_install -r requirements/test.txt
  pip_install --no-deps -e .
  done_step python-packages
fi

if changed interfaces CMakeLists.txt package.xml msg/* srv/* action/* cmake/*; then
  step "building the nanovlm ROS interfaces into the venv"
  # The wheels install a ROS prefix into the venv itself; CMake finds it through AMENT_PREFIX_PATH.
  export AMENT_PREFIX_PATH=$VIRTUAL_ENV
  mkdir -p build
  cmake -S . -B build/venv -DCMAKE_INSTALL_PREFIX="$VIRTUAL_ENV" -DBUILD_TESTING=OFF \
    -DNANOVLM_INSTALL_PYTHON_PACKAGE=OFF -DPython3_EXECUTABLE="$VIRTUAL_ENV/bin/python" > build/venv-cmake.log 2>&1 \
    || { cat build/venv-cmake.log; exit 1; }
  cmake --build build/venv -j "$(nproc)" > build/venv-build.log 2>&1 || { tail -50 build/venv-build.log; exit 1; }
  cmake --install build/venv > /dev/null
  done_step interfaces
fi

step "checking the install"
python - <<'PY'
from nanovlm.msg import VLMResult  # noqa: F401  (the generated interfaces)
from nanovlm.action import Ask  # noqa: F401
import rclpy, torch, transformers
from ros2_nanovlm.default_model import ensure_default_model
print(f"rclpy ok, torch {torch.__version__}, transformers {transformers.__version__}")
print(f"default model (the demo VLM, assembled on first run): {ensure_default_model()}")
PY
echo "nanovlm is set up in $venv"
