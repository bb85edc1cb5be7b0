#include "core/dtype_device.h"

#include "core/errors.h"

namespace cd {

namespace {
struct DtypeNameEntry {
  const char* name;
  at::ScalarType type;
};
constexpr DtypeNameEntry kDtypes[] = {
    {"float32", at::kFloat}, {"float16", at::kHalf}, {"bfloat16", at::kBFloat16}, {"float64", at::kDouble},
    {"int64", at::kLong},    {"int32", at::kInt},    {"int16", at::kShort},       {"int8", at::kChar},
    {"uint8", at::kByte},    {"bool", at::kBool},
};
}  // namespace

at::ScalarType ParseDtype(const std::string& name) {
  for (const auto& e : kDtypes)
    if (name == e.name) return e.type;
  throw Error("INVALID_ARGUMENT", "Unknown dtype \"" + name +
                                      "\". Use one of float32, float16, bfloat16, float64, int64, int32, "
                                      "int16, int8, uint8, bool.");
}

std::string DtypeName(at::ScalarType t) {
  for (const auto& e : kDtypes)
    if (t == e.type) return e.name;
  return c10::toString(t);
}

c10::Device ParseDevice(const std::string& name) {
  if (name == "cpu") return c10::Device(c10::kCPU);
  if (name == "cuda" || name.rfind("cuda:", 0) == 0) {
    int index = 0;
    if (name.size() > 5) {
      const std::string digits = name.substr(5);
      if (digits.empty() || digits.size() > 3 || digits.find_first_not_of("0123456789") != std::string::npos)
        throw Error("INVALID_ARGUMENT", "Bad device \"" + name + "\". Use cpu, cuda or cuda:N.");
      index = std::stoi(digits);
    }
    if (!at::hasCUDA())
      throw Error("DEVICE_UNAVAILABLE",
                  "Device \"" + name +
                      "\" was requested, but CUDA is not usable here (no CUDA-enabled LibTorch, no NVIDIA driver, "
                      "or no GPU). Run `customdiff doctor` to see what was found, or use --device cpu.");
    const int count = static_cast<int>(at::getNumGPUs());
    if (index >= count)
      throw Error("DEVICE_UNAVAILABLE", "Device \"" + name + "\" does not exist: this machine has " +
                                            std::to_string(count) + " CUDA device(s).");
    return c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(index));
  }
  throw Error("INVALID_ARGUMENT", "Bad device \"" + name + "\". Use cpu, cuda or cuda:N.");
}

std::string DeviceName(const c10::Device& d) {
  if (d.is_cpu()) return "cpu";
  if (d.is_cuda()) return "cuda:" + std::to_string(d.has_index() ? d.index() : 0);
  return d.str();
}

}  // namespace cd
