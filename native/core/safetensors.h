// safetensors: https://github.com/huggingface/safetensors (format: 8-byte little-endian header
// length N, N bytes of JSON, then the raw little-endian tensor data). This file holds the parser,
// validator, loader and writer; it knows nothing of Node so fuzzers and tests can link it alone.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace cd::safetensors {

struct Entry {
  std::string name;
  std::string dtype;  // as in the file: F32, F16, BF16, ...
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // offsets relative to the start of the data section
  uint64_t end = 0;
};

struct Header {
  std::vector<Entry> entries;  // in file order
  std::vector<std::pair<std::string, std::string>> metadata;
  uint64_t headerSize = 0;  // N
  uint64_t dataSize = 0;    // file size - 8 - N
};

// Header lengths above this are refused before any allocation (real files use a few hundred KB).
constexpr uint64_t kMaxHeaderSize = 100ull * 1024 * 1024;

// Validates the whole layout of a file given its bytes (only the first 8 + N are read; `size` is the
// file size). Throws cd::Error with code SAFETENSORS_FORMAT and props {file, tensor}.
Header ParseHeader(const uint8_t* data, uint64_t size, const std::string& file);

// Maps a safetensors dtype name to a torch dtype; throws for unknown names.
at::ScalarType ScalarTypeOf(const std::string& dtype, const std::string& file, const std::string& tensor);
std::string DtypeNameOf(at::ScalarType t);  // throws for dtypes safetensors cannot store
size_t ElementSize(const std::string& dtype);  // 0 for unknown

// A read-only (copy-on-write) memory map of a whole file.
class MappedFile {
 public:
  static std::shared_ptr<MappedFile> Open(const std::string& path);
  ~MappedFile();
  const uint8_t* data() const { return data_; }
  uint64_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  MappedFile() = default;
  uint8_t* data_ = nullptr;
  uint64_t size_ = 0;
  std::string path_;
};

struct LoadOptions {
  std::optional<at::ScalarType> dtype;  // convert floating-point tensors to this dtype
  c10::Device device = c10::Device(c10::kCPU);
  std::vector<std::string> only;  // when non-empty, load just these names (each must exist)
};

struct Loaded {
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  std::vector<std::pair<std::string, std::string>> metadata;
};

// Loads tensors. CPU tensors of the file's dtype alias the mapping (no copy; pages are read on first
// touch and written copy-on-write), so loading costs little more than the file itself.
Loaded Load(const std::string& path, const LoadOptions& options);
Header ReadHeader(const std::string& path);

// Writes a file atomically (temporary file in the same folder, fsync, rename).
void Save(const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
          const std::vector<std::pair<std::string, std::string>>& metadata);

}  // namespace cd::safetensors
