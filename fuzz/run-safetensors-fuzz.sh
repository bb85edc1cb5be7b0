#!/usr/bin/env bash
# Builds the libFuzzer target for the safetensors header parser and runs it for N seconds (default 60):
#   fuzz/run-safetensors-fuzz.sh [seconds]
# Needs clang with libFuzzer (`apt-get install -y clang`) and the LibTorch that the addon uses.
# Seeds are the safetensors files under test/fixtures; the corpus and any crash inputs stay in
# build-safetensors-fuzz/ (ignored by git).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
out=build-safetensors-fuzz
mkdir -p "$out/corpus" "$out/crashes" "$out/obj"

torch_root="$(node -e "console.log(require('./scripts/find-libtorch.js').findLibTorch().root)")"
flags=(-std=c++20 -O1 -g -fsanitize=fuzzer,address -fno-omit-frame-pointer -D_GLIBCXX_USE_CXX11_ABI=1
       -Inative -Inode_modules/node-api-headers/include -Inode_modules/node-addon-api
       -I"$torch_root/include" -I"$torch_root/include/torch/csrc/api/include")
objs=()
for src in fuzz/safetensors_fuzz.cc native/core/safetensors.cc native/core/json.cc; do
  obj="$out/obj/$(basename "$src" .cc).o"
  if [[ ! -f "$obj" || "$src" -nt "$obj" || native/core/safetensors.h -nt "$obj" || native/core/json.h -nt "$obj" ]]; then
    echo "compiling $src"
    clang++ "${flags[@]}" -c "$src" -o "$obj"
  fi
  objs+=("$obj")
done
clang++ -fsanitize=fuzzer,address "${objs[@]}" -L"$torch_root/lib" -Wl,-rpath,"$torch_root/lib" -ltorch_cpu -lc10 \
  -o "$out/safetensors_fuzz"

# Seeds: the headers of real files (data truncated to keep inputs small) plus a few whole small files.
python3 - "$out/corpus" <<'PY'
import glob, hashlib, os, struct, sys
out = sys.argv[1]
for f in glob.glob('test/fixtures/**/*.safetensors', recursive=True):
    data = open(f, 'rb').read()
    n = struct.unpack('<Q', data[:8])[0]
    seed = data if len(data) <= 65536 else data[:8 + n + 64]
    open(os.path.join(out, hashlib.sha1(seed).hexdigest()), 'wb').write(seed)
PY

export ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1"
"$out/safetensors_fuzz" "$out/corpus" -max_total_time="$seconds" -max_len=65536 -rss_limit_mb=4096 -timeout=10 \
  -artifact_prefix="$out/crashes/" -print_final_stats=1
