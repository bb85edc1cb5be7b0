#include "core/zip_reader.h"

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstring>

#include "core/errors.h"

namespace cd::zip {

namespace {

constexpr uint32_t kLocalSig = 0x04034b50;
constexpr uint32_t kCentralSig = 0x02014b50;
constexpr uint32_t kEocdSig = 0x06054b50;
constexpr uint32_t kZip64LocatorSig = 0x07064b50;
constexpr uint32_t kZip64EocdSig = 0x06064b50;
constexpr uint64_t kEocdSize = 22;
constexpr uint64_t kZip64LocatorSize = 20;
constexpr uint64_t kZip64EocdSize = 56;
constexpr uint64_t kCentralSize = 46;
constexpr uint64_t kLocalSize = 30;
constexpr uint64_t kMaxComment = 0xffff;

uint16_t U16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }
uint32_t U32(const uint8_t* p) {
  return static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8) | (static_cast<uint32_t>(p[2]) << 16) |
         (static_cast<uint32_t>(p[3]) << 24);
}
uint64_t U64(const uint8_t* p) { return static_cast<uint64_t>(U32(p)) | (static_cast<uint64_t>(U32(p + 4)) << 32); }

// [begin, begin + len) lies inside [0, limit), without overflow.
bool Fits(uint64_t begin, uint64_t len, uint64_t limit) { return begin <= limit && len <= limit - begin; }

std::string Hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

const std::array<uint32_t, 256>& CrcTable() {
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xedb88320u ^ (c >> 1) : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  return table;
}

}  // namespace

uint32_t Crc32(const uint8_t* data, uint64_t size) {
  const auto& t = CrcTable();
  uint32_t c = 0xffffffffu;
  for (uint64_t i = 0; i < size; ++i) c = t[(c ^ data[i]) & 0xff] ^ (c >> 8);
  return c ^ 0xffffffffu;
}

bool LooksLikeZip(const uint8_t* data, uint64_t size) {
  return size >= 4 && (U32(data) == kLocalSig || U32(data) == kEocdSig);
}

void Archive::Fail(const std::string& what) const {
  throw Error("PICKLE_FORMAT", "Invalid torch file " + file_ + ": " + what, {{"file", file_}});
}

Archive Archive::Open(const std::string& path) {
  auto map = safetensors::MappedFile::Open(path);
  return Parse(map->data(), map->size(), path, map);
}

Archive Archive::Parse(const uint8_t* data, uint64_t size, std::string file, std::shared_ptr<const void> owner) {
  Archive a;
  a.file_ = std::move(file);
  a.data_ = data;
  a.size_ = size;
  a.owner_ = std::move(owner);

  // The end-of-central-directory record is the last 22 bytes plus a comment of at most 64 KiB.
  if (size < kEocdSize)
    a.Fail("the file is " + std::to_string(size) + " bytes long, too short for a ZIP archive (is it truncated?)");
  uint64_t eocd = UINT64_MAX;
  const uint64_t lowest = size - kEocdSize > kMaxComment ? size - kEocdSize - kMaxComment : 0;
  for (uint64_t pos = size - kEocdSize + 1; pos-- > lowest;) {
    if (U32(data + pos) == kEocdSig && pos + kEocdSize + U16(data + pos + 20) <= size) {
      eocd = pos;
      break;
    }
  }
  if (eocd == UINT64_MAX)
    a.Fail("no ZIP end-of-central-directory record in the last 64 KiB (the file is truncated or is not a "
           "torch.save archive)");

  const uint8_t* e = data + eocd;
  uint64_t disk = U16(e + 4), cdDisk = U16(e + 6), entriesHere = U16(e + 8), entries = U16(e + 10);
  uint64_t cdSize = U32(e + 12), cdOffset = U32(e + 16);
  uint64_t cdLimit = eocd;  // the central directory ends before the record(s) that describe it

  // ZIP64: a locator just before the EOCD points at the ZIP64 record that holds the 64-bit values.
  if (eocd >= kZip64LocatorSize && U32(data + eocd - kZip64LocatorSize) == kZip64LocatorSig) {
    const uint8_t* loc = data + eocd - kZip64LocatorSize;
    const uint64_t recOffset = U64(loc + 8);
    if (U32(loc + 4) != 0 || U32(loc + 16) > 1) a.Fail("split (multi-disk) ZIP archives are not supported");
    if (!Fits(recOffset, kZip64EocdSize, eocd - kZip64LocatorSize))
      a.Fail("the ZIP64 end-of-central-directory record offset " + Hex(recOffset) + " lies outside the file");
    const uint8_t* r = data + recOffset;
    if (U32(r) != kZip64EocdSig) a.Fail("no ZIP64 end-of-central-directory record at offset " + Hex(recOffset));
    disk = U32(r + 16);
    cdDisk = U32(r + 20);
    entriesHere = U64(r + 24);
    entries = U64(r + 32);
    cdSize = U64(r + 40);
    cdOffset = U64(r + 48);
    cdLimit = recOffset;
  } else if (entries == 0xffff || cdSize == 0xffffffffu || cdOffset == 0xffffffffu) {
    // Only a marker value, no locator: the record that should hold the real values is missing.
    if (entries == 0xffff && cdSize != 0xffffffffu && cdOffset != 0xffffffffu) {
      // 65,535 entries exactly is legal without ZIP64.
    } else {
      a.Fail("the end-of-central-directory record needs ZIP64 values but no ZIP64 locator precedes it");
    }
  }
  if (disk != 0 || cdDisk != 0 || entriesHere != entries) a.Fail("split (multi-disk) ZIP archives are not supported");
  if (!Fits(cdOffset, cdSize, cdLimit))
    a.Fail("the central directory (offset " + Hex(cdOffset) + ", " + std::to_string(cdSize) +
           " bytes) lies outside the " + std::to_string(size) + "-byte file (is it truncated?)");
  if (entries > kMaxEntries)
    a.Fail("the archive claims " + std::to_string(entries) + " entries, more than the limit of " +
           std::to_string(kMaxEntries));
  if (entries > cdSize / kCentralSize)
    a.Fail("the central directory of " + std::to_string(cdSize) + " bytes cannot hold the " +
           std::to_string(entries) + " entries it claims");
  a.centralDirectoryOffset_ = cdOffset;

  a.entries_.reserve(entries);
  uint64_t pos = cdOffset;
  const uint64_t cdEnd = cdOffset + cdSize;
  for (uint64_t i = 0; i < entries; ++i) {
    if (!Fits(pos, kCentralSize, cdEnd))
      a.Fail("central directory entry " + std::to_string(i) + " runs past the end of the central directory");
    const uint8_t* c = data + pos;
    if (U32(c) != kCentralSig)
      a.Fail("bad signature for central directory entry " + std::to_string(i) + " at offset " + Hex(pos));
    Entry en;
    en.flags = U16(c + 8);
    en.method = U16(c + 10);
    en.crc32 = U32(c + 16);
    en.compressedSize = U32(c + 20);
    en.uncompressedSize = U32(c + 24);
    const uint64_t nameLen = U16(c + 28), extraLen = U16(c + 30), commentLen = U16(c + 32);
    uint64_t diskStart = U16(c + 34);
    en.localHeaderOffset = U32(c + 42);
    const uint64_t varLen = nameLen + extraLen + commentLen;
    if (!Fits(pos + kCentralSize, varLen, cdEnd))
      a.Fail("central directory entry " + std::to_string(i) + " runs past the end of the central directory");
    en.name.assign(reinterpret_cast<const char*>(c + kCentralSize), nameLen);
    if (en.name.empty() || en.name.find('\0') != std::string::npos)
      a.Fail("central directory entry " + std::to_string(i) + " has an empty or invalid name");

    // ZIP64 extended information: present values replace the 32/16-bit fields that hold the marker.
    const uint8_t* x = c + kCentralSize + nameLen;
    uint64_t xo = 0;
    while (xo + 4 <= extraLen) {
      const uint16_t id = U16(x + xo), len = U16(x + xo + 2);
      if (xo + 4 + len > extraLen) a.Fail("entry \"" + en.name + "\" has a malformed extra field");
      if (id == 0x0001) {
        const uint8_t* z = x + xo + 4;
        uint64_t zo = 0;
        auto take = [&](uint64_t& field) {
          if (zo + 8 > len) a.Fail("entry \"" + en.name + "\" has a truncated ZIP64 extra field");
          field = U64(z + zo);
          zo += 8;
        };
        if (en.uncompressedSize == 0xffffffffu) take(en.uncompressedSize);
        if (en.compressedSize == 0xffffffffu) take(en.compressedSize);
        if (en.localHeaderOffset == 0xffffffffu) take(en.localHeaderOffset);
        if (diskStart == 0xffff) {
          if (zo + 4 > len) a.Fail("entry \"" + en.name + "\" has a truncated ZIP64 extra field");
          diskStart = U32(z + zo);
        }
      }
      xo += 4 + len;
    }
    if (diskStart != 0) a.Fail("split (multi-disk) ZIP archives are not supported");
    if (en.localHeaderOffset >= cdOffset)
      a.Fail("entry \"" + en.name + "\" has a local header offset " + Hex(en.localHeaderOffset) +
             " outside the archive's data area");
    if (a.index_.count(en.name)) a.Fail("the archive holds two entries named \"" + en.name + "\"");
    a.index_.emplace(en.name, a.entries_.size());
    a.entries_.push_back(std::move(en));
    pos += kCentralSize + varLen;
  }
  return a;
}

const Entry* Archive::Find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &entries_[it->second];
}

Span Archive::Read(const Entry& en) const {
  const std::string what = "entry \"" + en.name + "\"";
  if (en.flags & 1) Fail(what + " is encrypted; encrypted archives are not supported");
  if (en.method != 0)
    Fail(what + " uses compression method " + std::to_string(en.method) +
         (en.method == 8 ? " (deflate)" : "") +
         "; only stored (uncompressed) entries are supported, as torch.save writes them. Re-save the file "
         "with torch.save, or convert it to safetensors");
  if (en.compressedSize != en.uncompressedSize)
    Fail(what + " is stored but its compressed size " + std::to_string(en.compressedSize) +
         " differs from its size " + std::to_string(en.uncompressedSize));
  if (!Fits(en.localHeaderOffset, kLocalSize, centralDirectoryOffset_))
    Fail(what + "'s local header at offset " + Hex(en.localHeaderOffset) + " lies outside the data area");
  const uint8_t* l = data_ + en.localHeaderOffset;
  if (U32(l) != kLocalSig) Fail(what + " has no local header at offset " + Hex(en.localHeaderOffset));
  const uint64_t nameLen = U16(l + 26), extraLen = U16(l + 28);
  const uint64_t nameAt = en.localHeaderOffset + kLocalSize;
  if (!Fits(nameAt, nameLen + extraLen, centralDirectoryOffset_))
    Fail(what + "'s local header runs past the data area");
  if (U16(l + 8) != en.method || nameLen != en.name.size() ||
      std::memcmp(l + kLocalSize, en.name.data(), nameLen) != 0)
    Fail(what + "'s local header disagrees with the central directory (name or compression method)");
  const uint64_t begin = nameAt + nameLen + extraLen;
  if (!Fits(begin, en.uncompressedSize, centralDirectoryOffset_))
    Fail(what + "'s " + std::to_string(en.uncompressedSize) + " bytes at offset " + Hex(begin) +
         " run past the data area of the " + std::to_string(size_) + "-byte file (is it truncated?)");
  return Span{data_ + begin, en.uncompressedSize, begin};
}

Span Archive::ReadVerified(const Entry& en) const {
  Span s = Read(en);
  // torch.serialization.set_crc32_options(False) writes 0 for every entry: nothing to check then.
  if (en.crc32 == 0) return s;
  const uint32_t crc = Crc32(s.data, s.size);
  if (crc != en.crc32)
    Fail("entry \"" + en.name + "\" is corrupt: its CRC-32 is " + Hex(crc) + ", the archive says " + Hex(en.crc32));
  return s;
}

}  // namespace cd::zip
