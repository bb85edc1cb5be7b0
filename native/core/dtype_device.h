// Names of dtypes and devices as the JS API spells them, and checks that a device is usable.
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace cd {

// "float32" | "float16" | "bfloat16" | "float64" | "int64" | "int32" | "int16" | "int8" | "uint8" | "bool".
at::ScalarType ParseDtype(const std::string& name);
std::string DtypeName(at::ScalarType t);

// "cpu" | "cuda" | "cuda:N". Throws DEVICE_UNAVAILABLE when this LibTorch or machine cannot serve it.
c10::Device ParseDevice(const std::string& name);
std::string DeviceName(const c10::Device& d);

}  // namespace cd
