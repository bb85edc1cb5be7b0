// A read-only ZIP reader for torch.save archives (PKWARE APPNOTE 6.3: end of central directory,
// ZIP64 end of central directory locator/record, central directory, local headers, ZIP64 extra
// fields). torch.save writes every entry uncompressed ("stored"), 64-byte aligned, so an entry's
// bytes can be used where they lie in the memory-mapped file; compressed, encrypted or split
// archives are refused with a clear error instead of being decoded. Every offset and length read
// from the file is checked against the file's size before it is used.
//
// Knows nothing of Node, so fuzzers and tests can link it alone.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "core/safetensors.h"

namespace cd::zip {

struct Entry {
  std::string name;
  uint16_t method = 0;  // 0 = stored; anything else is refused when the entry is read
  uint16_t flags = 0;   // general-purpose bit flags (bit 0: encrypted)
  uint32_t crc32 = 0;
  uint64_t compressedSize = 0;
  uint64_t uncompressedSize = 0;
  uint64_t localHeaderOffset = 0;
};

struct Span {
  const uint8_t* data = nullptr;
  uint64_t size = 0;
  uint64_t offset = 0;  // of the first byte, from the start of the file
};

// Central directories with more entries than this are refused before anything is allocated
// (an SD checkpoint holds about 1,200; Lightning checkpoints with optimizer state a few thousand).
constexpr uint64_t kMaxEntries = 1u << 20;

class Archive {
 public:
  // Parses the central directory of the `size` bytes at `data` (`file` names it in errors). `owner`
  // keeps the bytes alive for as long as the archive, or tensors aliasing it, exist. Throws
  // cd::Error with code PICKLE_FORMAT and props {file}.
  static Archive Parse(const uint8_t* data, uint64_t size, std::string file, std::shared_ptr<const void> owner = nullptr);
  // Memory-maps a file (FILE error when it cannot be opened) and parses it.
  static Archive Open(const std::string& path);

  const std::vector<Entry>& entries() const { return entries_; }
  const Entry* Find(const std::string& name) const;
  // The bytes of a stored entry, after checking its local header. Throws PICKLE_FORMAT for any other
  // compression method, encryption, a local header that disagrees with the central directory, or
  // data outside the file.
  Span Read(const Entry& e) const;
  // Read() plus a CRC-32 check of the bytes (touches every byte: use it for small entries). A
  // recorded CRC of 0 is not checked: torch writes 0 when saving with CRCs turned off.
  Span ReadVerified(const Entry& e) const;

  const std::string& file() const { return file_; }
  const uint8_t* data() const { return data_; }
  uint64_t size() const { return size_; }
  // Whatever keeps data() alive (the MappedFile for Open()).
  const std::shared_ptr<const void>& owner() const { return owner_; }

  [[noreturn]] void Fail(const std::string& what) const;

 private:
  std::string file_;
  const uint8_t* data_ = nullptr;
  uint64_t size_ = 0;
  std::shared_ptr<const void> owner_;
  std::vector<Entry> entries_;
  std::unordered_map<std::string, size_t> index_;
  uint64_t centralDirectoryOffset_ = 0;
};

// True when the bytes start like a ZIP archive (a local file header or an empty archive's EOCD).
bool LooksLikeZip(const uint8_t* data, uint64_t size);

uint32_t Crc32(const uint8_t* data, uint64_t size);

}  // namespace cd::zip
