#!/usr/bin/env bash
# Builds the libFuzzer target for the torch.save reader and runs it for N seconds (default 60):
#   fuzz/run-pickle-fuzz.sh [seconds]
# Needs clang with libFuzzer (`apt-get install -y clang`) and the LibTorch that the addon uses.
# Seeds come from test/fixtures/pickle (archives, and their data.pkl as bare pickles); the corpus
# and any crash inputs stay in build-pickle-fuzz/ (ignored by git).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
out=build-pickle-fuzz
mkdir -p "$out/corpus" "$out/crashes"

torch_root="$(node -e "console.log(require('./scripts/find-libtorch.js').findLibTorch().root)")"
flags=(-std=c++20 -O1 -g -fsanitize=fuzzer,address -fno-omit-frame-pointer -D_GLIBCXX_USE_CXX11_ABI=1
       -Inative -Inode_modules/node-api-headers/include -Inode_modules/node-addon-api
       -I"$torch_root/include" -I"$torch_root/include/torch/csrc/api/include")
mkdir -p "$out/obj"
objs=()
for src in fuzz/pickle_fuzz.cc native/core/pickle.cc native/core/zip_reader.cc; do
  obj="$out/obj/$(basename "$src" .cc).o"
  if [[ ! -f "$obj" || "$src" -nt "$obj" || native/core/pickle.h -nt "$obj" || native/core/zip_reader.h -nt "$obj" ]]; then
    echo "compiling $src"
    clang++ "${flags[@]}" -c "$src" -o "$obj"
  fi
  objs+=("$obj")
done
clang++ -fsanitize=fuzzer,address "${objs[@]}" -L"$torch_root/lib" -Wl,-rpath,"$torch_root/lib" -ltorch_cpu -lc10 \
  -o "$out/pickle_fuzz"

# Seeds: every fixture archive (mode byte 0) and its data.pkl as a bare pickle (mode byte 1).
python3 - "$out/corpus" <<'PY'
import hashlib, os, sys, zipfile
out = sys.argv[1]
root = 'test/fixtures/pickle'
for dp, _, fs in os.walk(root):
    for f in fs:
        if f.endswith('.json'):
            continue
        data = open(os.path.join(dp, f), 'rb').read()
        seeds = [b'\x00' + data]
        try:
            with zipfile.ZipFile(os.path.join(dp, f)) as z:
                seeds += [b'\x01' + z.read(n) for n in z.namelist() if n.endswith('data.pkl')]
        except Exception:
            pass
        for s in seeds:
            open(os.path.join(out, hashlib.sha1(s).hexdigest()), 'wb').write(s)
PY

export ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1"
"$out/pickle_fuzz" "$out/corpus" -max_total_time="$seconds" -max_len=65536 -rss_limit_mb=4096 -timeout=10 \
  -artifact_prefix="$out/crashes/" -print_final_stats=1
