#!/usr/bin/env bash
# The GPU check, in one command, on a bare GPU machine (or here, on a CPU):
#
#   bash scripts/gpu/run.sh [--pack DIR] [--pack-node] [--prebuilt] [run.py options...]
#
# 1. Unpacks what scripts/gpu/pack.sh put in gpu-pack/ (or --pack DIR): a Node.js binary (used when
#    the machine has no `node`, or with --pack-node), the runtime node_modules and the compiled
#    TypeScript (lib/) where the checkout has none, and the pure-Python diffusers (always, put first
#    on PYTHONPATH so the reference is the pinned version). Without a pack it uses what is installed.
# 2. Hands over to scripts/gpu/run.py, which compiles the addon against this machine's LibTorch (on
#    CUDA) while it makes a random-weight SD1.5 model on the device and, when the pack holds an addon
#    built for this very LibTorch, runs the parity suite (float32/float16/bfloat16) on that one
#    meanwhile; then the training and sampling benchmarks against diffusers, on the addon compiled
#    here (the prebuilt one stands in if the compile fails). --prebuilt skips the compile. One time
#    budget; gpu-run.json, gpu-run.md and run.log are written into --out (default $OUT/results,
#    else ./gpu-out) after every section.
#
# On a CPU: `bash scripts/gpu/run.sh --device cpu --tiny --budget 240` runs every section with a
# reduced-width model (what test/build/gpu-script.test.ts does).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1
root="$PWD"
pack="$root/gpu-pack"
work="$root/gpu-work"
pack_node=0
prebuilt=0
pass=()
while [ $# -gt 0 ]; do
  case "$1" in
    --pack) pack="$(cd "$2" && pwd)"; shift 2 ;;
    --pack-node) pack_node=1; shift ;;
    --prebuilt) prebuilt=1; shift ;;
    --work) work="$(mkdir -p "$2" && cd "$2" && pwd)"; shift 2 ;;
    *) pass+=("$1"); shift ;;
  esac
done
mkdir -p "$work"
t0=$(date +%s)
say() { echo "[run.sh $(( $(date +%s) - t0 ))s] $*"; }

# Extracts a .tar.xz with Python's tarfile (no xz binary needed).
untar() {
  python3 - "$1" "$2" <<'EOF'
import sys, tarfile
with tarfile.open(sys.argv[1]) as t:
    try:
        t.extractall(sys.argv[2], filter="tar")
    except TypeError:  # Python < 3.12
        t.extractall(sys.argv[2])
EOF
}

if [ -d "$pack" ]; then
  say "unpacking $pack"
  if [ -f "$pack/node.xz" ] && { [ "$pack_node" = 1 ] || ! command -v node >/dev/null 2>&1; }; then
    mkdir -p "$work/node/bin"
    if [ ! -x "$work/node/bin/node" ] || [ "$pack/node.xz" -nt "$work/node/bin/node" ]; then
      python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" \
        "$pack/node.xz" "$work/node/bin/node.part" && mv "$work/node/bin/node.part" "$work/node/bin/node"
      chmod +x "$work/node/bin/node"
    fi
    export PATH="$work/node/bin:$PATH"
  fi
  if [ ! -d node_modules/node-addon-api ] && [ -f "$pack/node_modules.tar.xz" ]; then untar "$pack/node_modules.tar.xz" "$root"; fi
  if [ ! -f lib/index.js ] && [ -f "$pack/lib.tar.xz" ]; then untar "$pack/lib.tar.xz" "$root"; fi
  if [ -f "$pack/python-site.tar.xz" ]; then
    if [ ! -f "$work/site/.complete" ] || [ "$pack/python-site.tar.xz" -nt "$work/site/.complete" ]; then
      rm -rf "$work/site" && mkdir -p "$work/site" && untar "$pack/python-site.tar.xz" "$work/site" && touch "$work/site/.complete"
    fi
    export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  if [ -f "$pack/addon/custom_diffusion.node" ]; then
    # Built elsewhere against the same LibTorch release (run.py checks its record against this
    # machine's LibTorch and puts this machine's LibTorch on the library path).
    if [ "$prebuilt" = 1 ]; then pass+=(--addon "$pack/addon/custom_diffusion.node"); else pass+=(--prebuilt-addon "$pack/addon/custom_diffusion.node"); fi
  fi
  say "unpacked"
fi
if ! command -v node >/dev/null 2>&1; then
  echo "run.sh: no node on PATH and no Node.js binary in the pack ($pack/node.xz)" >&2
fi
say "node $(node --version 2>/dev/null), python $(python3 --version 2>&1)"
exec python3 scripts/gpu/run.py --work "$work" "${pass[@]}"
