// A small strict JSON reader and writer: enough for safetensors headers and config files, with
// bounded depth so hostile input cannot exhaust the stack. Objects keep their key order and reject
// duplicate keys (a duplicated tensor name would be ambiguous).
#pragma once

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace cd::json {

class ParseError : public std::runtime_error {
 public:
  ParseError(const std::string& what, size_t offset)
      : std::runtime_error(what + " at byte " + std::to_string(offset)), offset_(offset) {}
  size_t offset() const { return offset_; }

 private:
  size_t offset_;
};

struct Member;

struct Value {
  enum class Kind { Null, Bool, Number, String, Array, Object };
  Kind kind = Kind::Null;
  bool boolean = false;
  double number = 0;
  // Integers are kept exactly when the text is an integer literal that fits in int64 (offsets of
  // large files exceed double's exact range only beyond 2^53, but we do not rely on that).
  bool isInteger = false;
  int64_t integer = 0;
  std::string string;
  std::vector<Value> array;
  // Key order kept. Not std::pair: std::pair of the still-incomplete Value is rejected by clang
  // with libstdc++ in C++20 (the fuzzers build with clang).
  std::vector<Member> object;

  const Value* find(const std::string& key) const;
  const char* kindName() const;
};

struct Member {
  Member(std::string k, Value v) : first(std::move(k)), second(std::move(v)) {}
  std::string first;
  Value second;
};

// Parses exactly one JSON document (surrounding whitespace allowed). Throws ParseError.
Value Parse(const char* data, size_t size, int maxDepth = 64);

// Appends `s` as a JSON string literal.
void AppendString(std::string& out, const std::string& s);

}  // namespace cd::json
