#!/usr/bin/env bash
# Set up nanovlm in a Python venv, from nothing but Python 3.10+, gcc and cmake:
#   ROS 2 Kilted (or Jazzy) from PyPI wheels, PyTorch, transformers, this package (editable), its
#   ROS interfaces built into the venv, and the embedded default model.
# Re-running it is quick: each step is skipped when its inputs have not changed.
#
#   ROS_DISTRO_WHEELS  kilted (default: requirements/ros-kilted.txt) or jazzy
#                      (requirements/ros-jazzy.txt); one distribution per venv
#   NANOVLM_VENV   where the venv goes (default: .venv in the checkout, .venv-jazzy for jazzy)
#   TORCH_SPEC     the torch requirement (default torch==2.13.0, a CPU build on the dev machines)
set -eo pipefail
cd "$(dirname "$0")/.."
root=$PWD
ros_distro=${ROS_DISTRO_WHEELS:-kilted}
case $ros_distro in
  kilted) default_venv=$root/.venv; interfaces_build=build/venv ;;
  jazzy) default_venv=$root/.venv-jazzy; interfaces_build=build/venv-jazzy ;;
  *) echo "ROS_DISTRO_WHEELS must be kilted or jazzy, not '$ros_distro'" >&2; exit 2 ;;
esac
ros_requirements=requirements/ros-$ros_distro.txt
venv=${NANOVLM_VENV:-$default_venv}
torch_spec=${TORCH_SPEC:-torch==2.13.0}
python=${PYTHON:-python3}

step() { printf '\n== %s\n' "$*"; }

if [ ! -x "$venv/bin/python" ]; then
  step "creating $venv"
  "$python" -m venv "$venv"
fi
# Keep git (and so ruff) out of any venv in the checkout, as Python 3.13's venv does by itself.
[ -e "$venv/.gitignore" ] || echo '*' > "$venv/.gitignore"
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

# One ROS distribution per venv: installing the other's wheels over it would mix two releases.
venv_distro=$(cat "$stamp_dir/ros-distro" 2>/dev/null || true)
if [ -n "$venv_distro" ] && [ "$venv_distro" != "$ros_distro" ]; then
  echo "$venv holds ROS 2 $venv_distro, not $ros_distro: set NANOVLM_VENV to another directory" >&2
  exit 2
fi
echo "$ros_distro" > "$stamp_dir/ros-distro"

# The requirements of this venv: every requirements file but the other distributions' ROS wheels.
requirements=()
for file in requirements/*.txt; do
  [[ $file == requirements/ros-*.txt && $file != "$ros_requirements" ]] || requirements+=("$file")
done

echo "$torch_spec" > "$stamp_dir/torch-spec"
if changed python-packages "${requirements[@]}" setup.py "$stamp_dir/torch-spec"; then
  step "installing ROS 2 $ros_distro wheels, $torch_spec, transformers"
  pip_install --upgrade pip
  pip_install -r "$ros_requirements"
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
  # One build directory per distribution: its CMake cache names that distribution's packages.
  mkdir -p build
  cmake -S . -B "$interfaces_build" -DCMAKE_INSTALL_PREFIX="$VIRTUAL_ENV" -DBUILD_TESTING=OFF \
    -DNANOVLM_INSTALL_PYTHON_PACKAGE=OFF -DPython3_EXECUTABLE="$VIRTUAL_ENV/bin/python" > "$interfaces_build-cmake.log" 2>&1 \
    || { cat "$interfaces_build-cmake.log"; exit 1; }
  cmake --build "$interfaces_build" -j "$(nproc)" > "$interfaces_build-build.log" 2>&1 || { tail -50 "$interfaces_build-build.log"; exit 1; }
  cmake --install "$interfaces_build" > /dev/null
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
