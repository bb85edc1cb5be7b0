#!/usr/bin/env bash
# Prepares gpu-pack/: everything a bare GPU machine (Python + CUDA PyTorch + cmake, no Node.js, no
# network) needs besides the checkout for scripts/gpu/run.sh. Git-ignored; sent with the device
# tool's `carry`.
#
#   bash scripts/gpu/pack.sh [--addon-from BUILD_DIR] [--out DIR] [--limit-mib 60] [--no-node] [--lib-from DIR]
#
# (--no-node leaves the Node.js binary out, for testing the pack on a machine that has node;
# --lib-from packs an already compiled lib/ instead of compiling; XZ_OPT=-0 compresses fast.)
#
#   node.xz              this machine's Node.js binary (x86-64 Linux, MIT licence: NODE-LICENSE),
#                        stripped and xz-compressed; reused while `node --version` is unchanged
#   node_modules.tar.xz  the runtime dependencies and their dependencies (no sharp: nothing in the
#                        check encodes images), plus node-api-headers for the addon build
#   lib.tar.xz           the compiled TypeScript (tsc into a private folder; the shared lib/ is untouched)
#   python-site.tar.xz   the installed diffusers (pure Python) with its dist-info: the reference;
#                        transformers, torch and the rest are the GPU machine's own
#   addon/               optional (--addon-from): an addon built elsewhere against the GPU machine's
#                        LibTorch release (its .libtorch.json says which), used by run.sh --prebuilt
#   MANIFEST.json        versions, sizes, commit
#
# Prints the pack's size, the working tree's size (both travel; the tool's limit is 64 MiB) and
# the exact device-tool invocation.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
root="$PWD"
out="$root/gpu-pack"
addon_from=""
limit_mib=60
with_node=1
lib_from=""
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --addon-from) addon_from="$(cd "$2" && pwd)"; shift 2 ;;
    --limit-mib) limit_mib="$2"; shift 2 ;;
    --no-node) with_node=0; shift ;;
    --lib-from) lib_from="$(cd "$2" && pwd)"; shift 2 ;;
    *) echo "pack.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
mkdir -p "$out"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
say() { echo "pack: $*" >&2; }

# ---- Node.js
node_bin="$(readlink -f "$(command -v node)")"
node_ver="$(node --version)"
if [ "$with_node" = 0 ]; then
  rm -f "$out/node.xz" "$out/node.version" "$out/NODE-LICENSE"
elif [ ! -f "$out/node.xz" ] || [ "$(cat "$out/node.version" 2>/dev/null)" != "$node_ver $(uname -m) stripped" ]; then
  # Without its debug information (distribution builds keep it): 2 MB less once compressed.
  say "compressing $node_bin ($node_ver, stripped; takes a minute or two)"
  strip -o "$tmp/node" "$node_bin" 2>/dev/null || cp "$node_bin" "$tmp/node"
  "$tmp/node" -e 'process.exit(0)'
  xz -9 -T2 -c "$tmp/node" > "$out/node.xz.part"
  mv "$out/node.xz.part" "$out/node.xz"
  echo "$node_ver $(uname -m) stripped" > "$out/node.version"
fi
if [ "$with_node" = 1 ]; then
  for lic in /usr/share/doc/nodejs/LICENSE "$(dirname "$node_bin")/../share/doc/node/LICENSE" "$(dirname "$node_bin")/../LICENSE"; do
    if [ -f "$lic" ]; then cp "$lic" "$out/NODE-LICENSE"; break; fi
  done
  [ -f "$out/NODE-LICENSE" ] || say "warning: no Node.js LICENSE file found to ship next to the binary"
fi

# ---- node_modules: the runtime closure
mods="$(node -e "
const fs = require('fs'), path = require('path');
const pkg = require('./package.json');
const skip = new Set(['sharp']);
const seen = new Set();
function walk(n) {
  if (seen.has(n) || skip.has(n)) return;
  const pj = path.join('node_modules', n, 'package.json');
  if (!fs.existsSync(pj)) return;
  seen.add(n);
  for (const d of Object.keys(JSON.parse(fs.readFileSync(pj, 'utf8')).dependencies || {})) walk(d);
}
for (const d of [...Object.keys(pkg.dependencies || {}), 'node-api-headers']) walk(d);
console.log([...seen].map((n) => 'node_modules/' + n).join('\n'));
")"
say "node_modules: $(echo "$mods" | wc -l) packages"
echo "$mods" | tar -cJf "$out/node_modules.tar.xz" -T -

# ---- lib/: compiled into a private folder
if [ -n "$lib_from" ]; then
  [ -f "$lib_from/index.js" ] || { echo "pack.sh: $lib_from has no index.js" >&2; exit 1; }
  mkdir -p "$tmp/lib" && cp -r "$lib_from/." "$tmp/lib/"
  find "$tmp/lib" \( -name '*.d.ts' -o -name '*.map' \) -delete
else
  say "compiling TypeScript"
  node_modules/.bin/tsc -p tsconfig.json --outDir "$tmp/lib" --sourceMap false --declaration false
  cp src/delta/regularization-captions.txt "$tmp/lib/delta/regularization-captions.txt"
fi
tar -cJf "$out/lib.tar.xz" -C "$tmp" lib

# ---- diffusers (pure Python) as installed here
# (found without importing it: an import of diffusers takes seconds)
read -r site dver < <(python3 -c 'import importlib.util as u, importlib.metadata as m, os
s = u.find_spec("diffusers")
print(os.path.dirname(os.path.dirname(s.origin)), m.version("diffusers"))')
say "diffusers $dver from $site"
tar --exclude=__pycache__ -cJf "$out/python-site.tar.xz" -C "$site" diffusers "diffusers-$dver.dist-info"

# ---- optional prebuilt addon
rm -rf "$out/addon"
if [ -n "$addon_from" ]; then
  mkdir -p "$out/addon"
  cp "$addon_from/custom_diffusion.node" "$addon_from/custom_diffusion.libtorch.json" "$out/addon/"
  strip --strip-unneeded "$out/addon/custom_diffusion.node" 2>/dev/null || true
fi

# ---- manifest
python3 - "$out" "$node_ver" "$dver" <<'EOF'
import json, os, subprocess, sys, time
out, node_ver, dver = sys.argv[1:4]
files = {}
for dp, _, fs in os.walk(out):
    for f in fs:
        if f == "MANIFEST.json":
            continue
        p = os.path.join(dp, f)
        files[os.path.relpath(p, out)] = os.path.getsize(p)
addon = None
side = os.path.join(out, "addon", "custom_diffusion.libtorch.json")
if os.path.isfile(side):
    addon = json.load(open(side))
commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
has_node = os.path.isfile(os.path.join(out, "node.xz"))
json.dump({"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": commit, "node": node_ver if has_node else None,
           "diffusers": dver, "prebuiltAddon": addon, "files": files}, open(os.path.join(out, "MANIFEST.json"), "w"), indent=2)
EOF

pack_bytes=$(du -sb "$out" | cut -f1)
tree_bytes=$( (git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null || true) | awk '{s += $1} END {print s + 0}')
mib() { awk -v b="$1" 'BEGIN {printf "%.1f", b / 1048576}'; }
echo "pack: $out = $(mib "$pack_bytes") MiB (limit $limit_mib MiB); working tree $(mib "$tree_bytes") MiB; together $(mib $((pack_bytes + tree_bytes))) MiB of the device tool's 64 MiB"
ls -la "$out" >&2
if [ "$pack_bytes" -gt $((limit_mib * 1048576)) ] || [ $((pack_bytes + tree_bytes)) -gt $((64 * 1048576)) ]; then
  echo "pack: too large" >&2
  exit 1
fi
cat <<EOF

Run it on the GPU machine with the device tool:
  run(command: "bash scripts/gpu/run.sh --budget 480", carry: ["$(basename "$out")"], timeout_s: 570)
(add --prebuilt to use the carried addon instead of compiling, when it was built for the machine's LibTorch)
Results come back as \$OUT/results/gpu-run.json, gpu-run.md and run.log; commit them under bench/results/.
EOF
