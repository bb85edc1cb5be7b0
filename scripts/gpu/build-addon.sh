#!/usr/bin/env bash
# Builds the native addon with plain CMake (no cmake-js, no download of Node headers): the Node-API
# headers come from the node-api-headers package. LibTorch is whatever scripts/find-libtorch.js
# finds ($LIBTORCH, else the torch package of $PYTHON / python3).
#
#   scripts/gpu/build-addon.sh BUILD_DIR [JOBS]
#
# Prints the path of the built addon (BUILD_DIR/custom_diffusion.node) as its last line.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
build="${1:?usage: build-addon.sh BUILD_DIR [JOBS]}"
jobs="${2:-$(nproc)}"
headers="$(cd "$root" && node -p "require('node-api-headers').include_dir" 2>/dev/null || true)"
if [ -z "$headers" ] || [ ! -f "$headers/node_api.h" ]; then
  headers="$root/node_modules/node-api-headers/include"
fi
[ -f "$headers/node_api.h" ] || { echo "build-addon: Node-API headers not found (node-api-headers package)" >&2; exit 1; }
gen=()
if command -v ninja >/dev/null 2>&1; then gen=(-G Ninja); fi
mkdir -p "$build"
cmake -S "$root" -B "$build" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DCMAKE_JS_INC="$headers" >&2
cmake --build "$build" -j "$jobs" >&2
echo "$build/custom_diffusion.node"
