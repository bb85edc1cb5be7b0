// libFuzzer target for the safetensors header parser and validator (native/core/safetensors.cc,
// native/core/json.cc). Every input is a whole file; a parse either succeeds, and then every entry
// must lie inside the data section, or fails with cd::Error. Any other exception, crash or ASan
// report is a finding. Build and run with fuzz/run-safetensors-fuzz.sh.
#include <cstdint>
#include <cstdlib>
#include <string>

#include "core/errors.h"
#include "core/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    cd::safetensors::Header h = cd::safetensors::ParseHeader(data, size, "fuzz-input");
    uint64_t total = 0;
    for (const auto& e : h.entries) {
      if (e.begin > e.end || e.end > h.dataSize) std::abort();
      total += e.end - e.begin;
    }
    if (total != h.dataSize) std::abort();  // the validator promises an exact tiling
  } catch (const cd::Error&) {
    // a clear error: the expected outcome for a bad file
  }
  return 0;
}
