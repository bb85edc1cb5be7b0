// libFuzzer target for the torch.save reader (native/core/zip_reader.cc, native/core/pickle.cc).
// The first input byte picks what the rest is: even → a whole torch.save archive; odd → a bare
// data.pkl, unpickled with storages made up on request (the archive's CRC would otherwise reject
// almost every mutation of the pickle). Every tensor of the result is then read element by element
// in this (instrumented) file, so a view that escapes its storage is an ASan report, not a silent
// read inside LibTorch. Any exception other than cd::Error is a finding: the reader must turn every
// bad input into a clear error. Build and run with fuzz/run-pickle-fuzz.sh.
#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>
#include <string>

#include "core/errors.h"
#include "core/pickle.h"
#include "core/safetensors.h"

namespace {

using cd::pickle::Value;

volatile uint8_t sink;

void Touch(const at::Tensor& t) {
  if (!t.defined() || t.numel() == 0) return;
  const auto* base = static_cast<const uint8_t*>(t.storage().data());
  const int64_t item = static_cast<int64_t>(t.element_size());
  const int64_t dims = t.dim();
  std::vector<int64_t> idx(static_cast<size_t>(dims), 0);
  int64_t count = 0;
  while (true) {
    int64_t off = t.storage_offset();
    for (int64_t d = 0; d < dims; ++d) off += idx[d] * t.stride(d);
    const uint8_t* p = base + off * item;
    for (int64_t b = 0; b < item; ++b) sink = p[b];
    if (++count > (1 << 16)) return;  // enough to cover the bounds; keep runs fast
    int64_t d = dims - 1;
    while (d >= 0 && ++idx[d] == t.size(d)) idx[d--] = 0;
    if (d < 0) return;
  }
}

void Walk(const Value& v, int depth) {
  if (depth > 600) __builtin_trap();  // the validator bounds depth at 512
  switch (v.kind) {
    case Value::Kind::Tensor: Touch(v.tensor); break;
    case Value::Kind::List:
    case Value::Kind::Tuple:
      for (const Value* x : v.items) Walk(*x, depth + 1);
      break;
    case Value::Kind::Dict:
      for (const auto& [k, x] : v.dict) {
        (void)cd::pickle::KeyText(*k);
        Walk(*k, depth + 1);
        Walk(*x, depth + 1);
      }
      break;
    case Value::Kind::Global:
    case Value::Kind::Storage: __builtin_trap();  // must not survive into a finished document
    default: break;
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const bool bare = data[0] & 1;
  cd::pickle::Limits limits;
  limits.maxValues = 1 << 16;  // keep each run small; the limits themselves are what is exercised
  limits.maxSlots = 1 << 18;
  limits.maxTreeNodes = 1 << 16;
  limits.maxStack = 1 << 16;
  limits.maxMemo = 1 << 16;
  try {
    std::shared_ptr<cd::pickle::Document> doc;
    if (bare) {
      cd::pickle::UnpickleOptions o;
      o.limits = limits;
      o.storages = [](const std::string& key, uint64_t nbytes) -> c10::Storage {
        if (nbytes > (1u << 20)) throw cd::Error("PICKLE_FORMAT", "fuzz: storage too large");
        return at::zeros({static_cast<int64_t>(nbytes)}, at::kByte).storage();
      };
      doc = cd::pickle::Unpickle(data + 1, size - 1, "fuzz.pkl", o);
    } else {
      cd::pickle::LoadOptions o;
      o.limits = limits;
      doc = cd::pickle::LoadTorchBytes(data + 1, size - 1, "fuzz.pt", o);
    }
    Walk(*doc->root, 0);
    (void)cd::pickle::FlattenTensors(*doc);
  } catch (const cd::Error&) {
    // A clear, typed refusal: the expected outcome for bad input.
  }
  return 0;
}

// The fuzzer reads bytes from memory only; these stand in for core/safetensors.cc (not linked: its
// JSON parser does not build with clang 14's C++20 mode against libstdc++ 12).
namespace cd::safetensors {
std::shared_ptr<MappedFile> MappedFile::Open(const std::string& path) {
  throw cd::Error("FILE", "the fuzzer does not open files: " + path);
}
MappedFile::~MappedFile() = default;
}  // namespace cd::safetensors
