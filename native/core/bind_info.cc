// info(): what LibTorch this addon was built against and what it can use here; thread control.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <dlfcn.h>
#include <napi.h>
#include <torch/headeronly/version.h>

#include <cstdlib>
#include <string>

// The device caching allocator's statistics (torch ≥ 2.9): declared in LibTorch's CPU library, so
// this needs no CUDA headers and compiles against CPU LibTorch too.
#if defined(TORCH_VERSION_MAJOR) && (TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 9))
#include <ATen/DeviceAccelerator.h>
#define CD_HAVE_DEVICE_STATS 1
#endif

#include "core/registry.h"
#include "core/errors.h"
#include "core/tensor.h"

#ifndef TORCH_VERSION
#define TORCH_VERSION "unknown"
#endif
#ifndef CD_LIBTORCH_IDENTITY
#define CD_LIBTORCH_IDENTITY "unknown"
#endif

namespace cd {

namespace {

struct CudaDevice {
  int index;
  std::string name;
  double totalMemory;
  int major;
  int minor;
};

// Device names and memory come from the CUDA driver API, loaded at run time: the addon then needs
// no CUDA headers or toolkit to build, and the driver's C ABI is stable.
std::vector<CudaDevice> QueryCudaDevices(std::string& driverVersion) {
  std::vector<CudaDevice> out;
  void* lib = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_LOCAL);
  if (!lib) return out;
  using InitFn = int (*)(unsigned);
  using CountFn = int (*)(int*);
  using GetFn = int (*)(int*, int);
  using NameFn = int (*)(char*, int, int);
  using MemFn = int (*)(size_t*, int);
  using AttrFn = int (*)(int*, int, int);
  using VerFn = int (*)(int*);
  auto init = reinterpret_cast<InitFn>(dlsym(lib, "cuInit"));
  auto count = reinterpret_cast<CountFn>(dlsym(lib, "cuDeviceGetCount"));
  auto get = reinterpret_cast<GetFn>(dlsym(lib, "cuDeviceGet"));
  auto name = reinterpret_cast<NameFn>(dlsym(lib, "cuDeviceGetName"));
  auto mem = reinterpret_cast<MemFn>(dlsym(lib, "cuDeviceTotalMem_v2"));
  auto attr = reinterpret_cast<AttrFn>(dlsym(lib, "cuDeviceGetAttribute"));
  auto ver = reinterpret_cast<VerFn>(dlsym(lib, "cuDriverGetVersion"));
  int n = 0;
  if (init && count && get && init(0) == 0 && count(&n) == 0) {
    int v = 0;
    if (ver && ver(&v) == 0) driverVersion = std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
    for (int i = 0; i < n; ++i) {
      int dev = 0;
      if (get(&dev, i) != 0) continue;
      CudaDevice d{i, "", 0, 0, 0};
      char buf[256] = {0};
      if (name && name(buf, sizeof(buf) - 1, dev) == 0) d.name = buf;
      size_t bytes = 0;
      if (mem && mem(&bytes, dev) == 0) d.totalMemory = static_cast<double>(bytes);
      if (attr) {
        attr(&d.major, 75, dev);  // CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
        attr(&d.minor, 76, dev);  // CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR
      }
      out.push_back(d);
    }
  }
  // The driver stays loaded: LibTorch's CUDA backend uses the same library.
  return out;
}

// OpenMP's wait settings as libgomp read them: both run their initialisers when the addon is loaded,
// libgomp (a dependency of LibTorch) first, and neither looks at the variables again.
std::string EnvAtLoad(const char* name) {
  const char* v = std::getenv(name);
  return v ? std::string(v) : std::string();
}
const std::string kOmpWaitPolicyAtLoad = EnvAtLoad("OMP_WAIT_POLICY");
const std::string kGompSpinCountAtLoad = EnvAtLoad("GOMP_SPINCOUNT");

Napi::Value Info(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    Napi::Object o = Napi::Object::New(env);
    o.Set("torchVersion", TORCH_VERSION);
    // The LibTorch identity (scripts/find-libtorch.js) this addon was compiled against.
    o.Set("libtorchIdentity", CD_LIBTORCH_IDENTITY);
#ifdef CD_LIBTORCH_CUDA
    o.Set("builtWithCuda", true);
#else
    o.Set("builtWithCuda", false);
#endif
    const bool cuda = at::hasCUDA();
    o.Set("cudaAvailable", cuda);
    o.Set("cudnnAvailable", cuda && at::globalContext().hasCuDNN());
    o.Set("cudaDeviceCount", cuda ? static_cast<double>(at::getNumGPUs()) : 0.0);
    std::string driver;
    Napi::Array devices = Napi::Array::New(env);
    if (cuda) {
      auto list = QueryCudaDevices(driver);
      for (size_t i = 0; i < list.size(); ++i) {
        Napi::Object d = Napi::Object::New(env);
        d.Set("index", list[i].index);
        d.Set("name", list[i].name);
        d.Set("totalMemory", list[i].totalMemory);
        d.Set("computeCapability", std::to_string(list[i].major) + "." + std::to_string(list[i].minor));
        devices.Set(static_cast<uint32_t>(i), d);
      }
    }
    o.Set("cudaDevices", devices);
    if (!driver.empty()) o.Set("cudaDriverVersion", driver);
    o.Set("mkldnnAvailable", at::hasMKLDNN());
    o.Set("numThreads", at::get_num_threads());
    o.Set("numInteropThreads", at::get_num_interop_threads());
    o.Set("parallelInfo", at::get_parallel_info());
    auto orNull = [&](const std::string& v) -> Napi::Value { return v.empty() ? env.Null() : Napi::String::New(env, v); };
    o.Set("ompWaitPolicy", orNull(kOmpWaitPolicyAtLoad));
    o.Set("gompSpinCount", orNull(kGompSpinCountAtLoad));
    o.Set("liveTensors", static_cast<double>(TensorWrap::Live()));
    return o;
  });
}

Napi::Value SetNumThreads(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    Require(info[0].IsNumber(), "setNumThreads expects a positive integer");
    const int n = info[0].As<Napi::Number>().Int32Value();
    Require(n >= 1 && n <= 4096, "setNumThreads expects a positive integer");
    at::set_num_threads(n);
    return env.Undefined();
  });
}

Napi::Value GetNumThreads(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), at::get_num_threads());
}

Napi::Value LiveTensors(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), static_cast<double>(TensorWrap::Live()));
}

// cudaMemoryStats(device = 0, resetPeak = false): the CUDA caching allocator's current and peak
// bytes (torch.cuda.memory_allocated / max_memory_allocated / memory_reserved /
// max_memory_reserved), or null without CUDA. With resetPeak the peaks restart after reading.
Napi::Value CudaMemoryStats(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    const int device = info.Length() > 0 && info[0].IsNumber() ? info[0].As<Napi::Number>().Int32Value() : 0;
    const bool reset = info.Length() > 1 && info[1].IsBoolean() && info[1].As<Napi::Boolean>().Value();
#ifdef CD_HAVE_DEVICE_STATS
    if (!at::hasCUDA()) return env.Null();
    Require(device >= 0 && static_cast<size_t>(device) < at::getNumGPUs(), "cudaMemoryStats: no CUDA device " + std::to_string(device));
    const auto index = static_cast<c10::DeviceIndex>(device);
    const auto stats = at::accelerator::getDeviceStats(index);
    Napi::Object o = Napi::Object::New(env);
    o.Set("device", device);
    o.Set("allocatedBytes", static_cast<double>(stats.allocated_bytes[0].current));
    o.Set("peakAllocatedBytes", static_cast<double>(stats.allocated_bytes[0].peak));
    o.Set("reservedBytes", static_cast<double>(stats.reserved_bytes[0].current));
    o.Set("peakReservedBytes", static_cast<double>(stats.reserved_bytes[0].peak));
    if (reset) at::accelerator::resetPeakStats(index);
    return o;
#else
    return env.Null();
#endif
  });
}

}  // namespace

void InitInfo(Napi::Env env, Napi::Object exports) {
  exports.Set("info", Napi::Function::New(env, Info, "info"));
  exports.Set("setNumThreads", Napi::Function::New(env, SetNumThreads, "setNumThreads"));
  exports.Set("getNumThreads", Napi::Function::New(env, GetNumThreads, "getNumThreads"));
  exports.Set("liveTensors", Napi::Function::New(env, LiveTensors, "liveTensors"));
  exports.Set("cudaMemoryStats", Napi::Function::New(env, CudaMemoryStats, "cudaMemoryStats"));
}

CD_REGISTER_BINDING(info, InitInfo);

}  // namespace cd
