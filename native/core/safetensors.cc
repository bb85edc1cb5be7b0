#include "core/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <limits>

#include "core/errors.h"
#include "core/json.h"

namespace cd::safetensors {

namespace {

[[noreturn]] void Fail(const std::string& file, const std::string& tensor, const std::string& what) {
  std::string msg = "Invalid safetensors file " + file;
  if (!tensor.empty()) msg += ", tensor \"" + tensor + "\"";
  msg += ": " + what;
  std::map<std::string, std::string> props{{"file", file}};
  if (!tensor.empty()) props["tensor"] = tensor;
  throw Error("SAFETENSORS_FORMAT", msg, props);
}

[[noreturn]] void FileFail(const std::string& file, const std::string& what) {
  throw Error("FILE", what + ": " + file + " (" + std::strerror(errno) + ")", {{"file", file}});
}

struct DtypeInfo {
  const char* name;
  at::ScalarType type;
  size_t size;
};
const DtypeInfo kDtypes[] = {
    {"F64", at::kDouble, 8},          {"F32", at::kFloat, 4},        {"F16", at::kHalf, 2},
    {"BF16", at::kBFloat16, 2},       {"I64", at::kLong, 8},         {"I32", at::kInt, 4},
    {"I16", at::kShort, 2},           {"I8", at::kChar, 1},          {"U8", at::kByte, 1},
    {"BOOL", at::kBool, 1},           {"F8_E4M3", at::kFloat8_e4m3fn, 1}, {"F8_E5M2", at::kFloat8_e5m2, 1},
};

uint64_t ReadU64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

uint64_t CheckedInt(const json::Value& v, const std::string& file, const std::string& tensor, const char* what) {
  if (v.kind != json::Value::Kind::Number || !v.isInteger || v.integer < 0)
    Fail(file, tensor, std::string(what) + " must be a non-negative integer, got " + v.kindName());
  return static_cast<uint64_t>(v.integer);
}

}  // namespace

size_t ElementSize(const std::string& dtype) {
  for (const auto& d : kDtypes)
    if (dtype == d.name) return d.size;
  return 0;
}

at::ScalarType ScalarTypeOf(const std::string& dtype, const std::string& file, const std::string& tensor) {
  for (const auto& d : kDtypes)
    if (dtype == d.name) return d.type;
  Fail(file, tensor, "unknown dtype \"" + dtype + "\"");
}

std::string DtypeNameOf(at::ScalarType t) {
  for (const auto& d : kDtypes)
    if (t == d.type) return d.name;
  throw Error("INVALID_ARGUMENT", std::string("safetensors cannot store dtype ") + c10::toString(t));
}

Header ParseHeader(const uint8_t* data, uint64_t size, const std::string& file) {
  if (size < 8)
    Fail(file, "", "the file is " + std::to_string(size) +
                       " bytes long, too short to hold the 8-byte header length (is it truncated?)");
  Header h;
  h.headerSize = ReadU64(data);
  if (h.headerSize == 0) Fail(file, "", "the header length is 0");
  if (h.headerSize > kMaxHeaderSize)
    Fail(file, "", "the header length " + std::to_string(h.headerSize) + " exceeds the limit of " +
                       std::to_string(kMaxHeaderSize) + " bytes (not a safetensors file?)");
  if (h.headerSize > size - 8)
    Fail(file, "", "the header length " + std::to_string(h.headerSize) + " runs past the end of the " +
                       std::to_string(size) + "-byte file (is it truncated?)");
  h.dataSize = size - 8 - h.headerSize;
  const char* text = reinterpret_cast<const char*>(data + 8);
  if (text[0] != '{') Fail(file, "", "the header does not start with '{'");
  json::Value root;
  try {
    root = json::Parse(text, h.headerSize);
  } catch (const json::ParseError& e) {
    Fail(file, "", std::string("the header is not valid JSON (") + e.what() + ")");
  }
  if (root.kind != json::Value::Kind::Object) Fail(file, "", "the header is not a JSON object");

  for (const auto& [name, v] : root.object) {
    if (name == "__metadata__") {
      if (v.kind != json::Value::Kind::Object) Fail(file, "", "__metadata__ must be an object of strings");
      for (const auto& [k, mv] : v.object) {
        if (mv.kind != json::Value::Kind::String)
          Fail(file, "", "__metadata__ value for \"" + k + "\" must be a string, got " + mv.kindName());
        h.metadata.emplace_back(k, mv.string);
      }
      continue;
    }
    if (v.kind != json::Value::Kind::Object) Fail(file, name, "the entry must be an object");
    Entry e;
    e.name = name;
    const json::Value* dtype = nullptr;
    const json::Value* shape = nullptr;
    const json::Value* offsets = nullptr;
    for (const auto& [field, fv] : v.object) {
      if (field == "dtype") dtype = &fv;
      else if (field == "shape") shape = &fv;
      else if (field == "data_offsets") offsets = &fv;
      else Fail(file, name, "unexpected field \"" + field + "\"");
    }
    if (!dtype || dtype->kind != json::Value::Kind::String) Fail(file, name, "missing or non-string \"dtype\"");
    if (!shape || shape->kind != json::Value::Kind::Array) Fail(file, name, "missing or non-array \"shape\"");
    if (!offsets || offsets->kind != json::Value::Kind::Array || offsets->array.size() != 2)
      Fail(file, name, "\"data_offsets\" must be an array of two integers");
    e.dtype = dtype->string;
    const size_t elem = ElementSize(e.dtype);
    if (elem == 0) Fail(file, name, "unknown dtype \"" + e.dtype + "\"");
    uint64_t numel = 1;
    bool overflow = false;
    for (const auto& d : shape->array) {
      uint64_t dim = CheckedInt(d, file, name, "each shape dimension");
      if (dim > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) overflow = true;
      if (dim != 0 && numel > std::numeric_limits<uint64_t>::max() / dim) overflow = true;
      numel *= dim;
      e.shape.push_back(static_cast<int64_t>(dim));
    }
    if (overflow || numel > std::numeric_limits<uint64_t>::max() / elem)
      Fail(file, name, "the shape's element count overflows");
    e.begin = CheckedInt(offsets->array[0], file, name, "data_offsets[0]");
    e.end = CheckedInt(offsets->array[1], file, name, "data_offsets[1]");
    if (e.end < e.begin) Fail(file, name, "data_offsets end is before begin");
    if (e.end > h.dataSize)
      Fail(file, name, "data_offsets [" + std::to_string(e.begin) + ", " + std::to_string(e.end) +
                           "] run past the " + std::to_string(h.dataSize) +
                           "-byte data section (is the file truncated?)");
    if (e.end - e.begin != numel * elem)
      Fail(file, name, "holds " + std::to_string(e.end - e.begin) + " bytes but dtype " + e.dtype + " and shape need " +
                           std::to_string(numel * elem));
    h.entries.push_back(std::move(e));
  }

  // The data section must be tiled exactly: no overlaps, no holes, nothing after the last tensor
  // (the reference implementation refuses the same files).
  std::vector<const Entry*> order;
  for (const auto& e : h.entries) order.push_back(&e);
  std::stable_sort(order.begin(), order.end(), [](const Entry* a, const Entry* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  uint64_t cursor = 0;
  const Entry* prev = nullptr;
  for (const Entry* e : order) {
    if (e->begin < cursor)
      Fail(file, e->name, "its bytes overlap those of \"" + (prev ? prev->name : std::string()) + "\"");
    if (e->begin > cursor)
      Fail(file, e->name, "there is a gap of " + std::to_string(e->begin - cursor) + " bytes before it");
    cursor = e->end;
    prev = e;
  }
  if (cursor != h.dataSize)
    Fail(file, "", std::to_string(h.dataSize - cursor) + " bytes after the last tensor belong to no tensor");
  return h;
}

std::shared_ptr<MappedFile> MappedFile::Open(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) FileFail(path, errno == ENOENT ? "File not found" : "Cannot open file");
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    FileFail(path, "Cannot stat file");
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    errno = EISDIR;
    FileFail(path, "Not a regular file");
  }
  std::shared_ptr<MappedFile> m(new MappedFile());
  m->path_ = path;
  m->size_ = static_cast<uint64_t>(st.st_size);
  if (m->size_ > 0) {
    // Private and writable: a tensor that aliases the map may be modified in place (copy-on-write);
    // the file itself never changes.
    void* p = ::mmap(nullptr, m->size_, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      ::close(fd);
      FileFail(path, "Cannot memory-map file");
    }
    m->data_ = static_cast<uint8_t*>(p);
  }
  ::close(fd);
  return m;
}

MappedFile::~MappedFile() {
  if (data_) ::munmap(data_, size_);
}

Header ReadHeader(const std::string& path) {
  auto map = MappedFile::Open(path);
  return ParseHeader(map->data(), map->size(), path);
}

Loaded Load(const std::string& path, const LoadOptions& options) {
  auto map = MappedFile::Open(path);
  Header h = ParseHeader(map->data(), map->size(), path);
  Loaded out;
  out.metadata = h.metadata;
  std::vector<const Entry*> wanted;
  if (options.only.empty()) {
    for (const auto& e : h.entries) wanted.push_back(&e);
  } else {
    for (const auto& name : options.only) {
      auto it = std::find_if(h.entries.begin(), h.entries.end(), [&](const Entry& e) { return e.name == name; });
      if (it == h.entries.end())
        throw Error("SAFETENSORS_FORMAT", "Tensor \"" + name + "\" is not in " + path, {{"file", path}, {"tensor", name}});
      wanted.push_back(&*it);
    }
  }
  const uint8_t* base = map->data() + 8 + h.headerSize;
  for (const Entry* e : wanted) {
    const at::ScalarType type = ScalarTypeOf(e->dtype, path, e->name);
    const size_t elem = ElementSize(e->dtype);
    at::Tensor t;
    const uint8_t* ptr = base + e->begin;
    if (e->end == e->begin) {
      t = at::empty(e->shape, at::TensorOptions().dtype(type));
    } else if (reinterpret_cast<uintptr_t>(ptr) % elem == 0) {
      auto keep = map;
      t = at::from_blob(
          const_cast<uint8_t*>(ptr), e->shape, [keep](void*) mutable { keep.reset(); },
          at::TensorOptions().dtype(type));
    } else {
      // Misaligned data (a header whose length is not a multiple of 8): copy once into aligned memory.
      t = at::empty(e->shape, at::TensorOptions().dtype(type));
      std::memcpy(t.data_ptr(), ptr, e->end - e->begin);
    }
    if (options.dtype && at::isFloatingType(type) && *options.dtype != type) t = t.to(*options.dtype);
    if (!options.device.is_cpu()) t = t.to(options.device);
    out.tensors.emplace_back(e->name, std::move(t));
  }
  return out;
}

namespace {

void WriteAll(int fd, const void* data, size_t n, const std::string& tmp) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    const size_t chunk = std::min<size_t>(n, 64u << 20);
    ssize_t w = ::write(fd, p, chunk);
    if (w < 0) {
      if (errno == EINTR) continue;
      FileFail(tmp, "Cannot write file");
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
}

std::atomic<uint64_t> gTmpCounter{0};

}  // namespace

void Save(const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
          const std::vector<std::pair<std::string, std::string>>& metadata) {
  std::vector<at::Tensor> data;
  std::string header = "{";
  bool first = true;
  if (!metadata.empty()) {
    header += "\"__metadata__\":{";
    for (size_t i = 0; i < metadata.size(); ++i) {
      if (i) header += ',';
      json::AppendString(header, metadata[i].first);
      header += ':';
      json::AppendString(header, metadata[i].second);
    }
    header += '}';
    first = false;
  }
  uint64_t offset = 0;
  for (const auto& [name, tensor] : tensors) {
    if (name == "__metadata__") throw Error("INVALID_ARGUMENT", "A tensor cannot be named __metadata__");
    if (!tensor.defined()) throw Error("INVALID_ARGUMENT", "Tensor \"" + name + "\" is undefined");
    const std::string dtype = DtypeNameOf(tensor.scalar_type());
    at::Tensor t = tensor.detach().to(c10::Device(c10::kCPU)).contiguous();
    const uint64_t bytes = static_cast<uint64_t>(t.numel()) * t.element_size();
    if (!first) header += ',';
    first = false;
    json::AppendString(header, name);
    header += ":{\"dtype\":\"" + dtype + "\",\"shape\":[";
    for (int64_t d = 0; d < t.dim(); ++d) {
      if (d) header += ',';
      header += std::to_string(t.size(d));
    }
    header += "],\"data_offsets\":[" + std::to_string(offset) + "," + std::to_string(offset + bytes) + "]}";
    offset += bytes;
    data.push_back(std::move(t));
  }
  header += '}';
  // Pad with spaces so the data section starts 8-byte aligned, as the reference writer does.
  while (header.size() % 8) header += ' ';

  const std::string tmp = path + ".tmp-" + std::to_string(::getpid()) + "-" + std::to_string(gTmpCounter++);
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) FileFail(path, "Cannot create file");
  try {
    uint8_t len[8];
    uint64_t n = header.size();
    for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(n >> (8 * i));
    WriteAll(fd, len, 8, tmp);
    WriteAll(fd, header.data(), header.size(), tmp);
    for (const auto& t : data) WriteAll(fd, t.data_ptr(), static_cast<size_t>(t.numel()) * t.element_size(), tmp);
    if (::fsync(fd) != 0) FileFail(tmp, "Cannot flush file");
    if (::close(fd) != 0) {
      fd = -1;
      FileFail(tmp, "Cannot close file");
    }
    fd = -1;
    if (::rename(tmp.c_str(), path.c_str()) != 0) FileFail(path, "Cannot rename temporary file onto");
  } catch (...) {
    if (fd >= 0) ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
}

}  // namespace cd::safetensors
