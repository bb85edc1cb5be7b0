#include "core/json.h"

#include <cerrno>
#include <cstdlib>
#include <cstring>

namespace cd::json {

const Value* Value::find(const std::string& key) const {
  for (const auto& [k, v] : object)
    if (k == key) return &v;
  return nullptr;
}

const char* Value::kindName() const {
  switch (kind) {
    case Kind::Null: return "null";
    case Kind::Bool: return "boolean";
    case Kind::Number: return "number";
    case Kind::String: return "string";
    case Kind::Array: return "array";
    case Kind::Object: return "object";
  }
  return "?";
}

namespace {

class Parser {
 public:
  Parser(const char* d, size_t n, int maxDepth) : d_(d), n_(n), maxDepth_(maxDepth) {}

  Value Document() {
    SkipWs();
    Value v = ParseValue(0);
    SkipWs();
    if (i_ != n_) Fail("unexpected trailing characters");
    return v;
  }

 private:
  [[noreturn]] void Fail(const std::string& what) { throw ParseError(what, i_); }

  void SkipWs() {
    while (i_ < n_ && (d_[i_] == ' ' || d_[i_] == '\t' || d_[i_] == '\n' || d_[i_] == '\r')) ++i_;
  }

  bool Consume(const char* lit) {
    size_t len = std::strlen(lit);
    if (n_ - i_ >= len && std::memcmp(d_ + i_, lit, len) == 0) {
      i_ += len;
      return true;
    }
    return false;
  }

  Value ParseValue(int depth) {
    if (depth > maxDepth_) Fail("nesting too deep");
    if (i_ >= n_) Fail("unexpected end of input");
    Value v;
    char c = d_[i_];
    if (c == '{') {
      v.kind = Value::Kind::Object;
      ++i_;
      SkipWs();
      if (i_ < n_ && d_[i_] == '}') {
        ++i_;
        return v;
      }
      for (;;) {
        SkipWs();
        if (i_ >= n_ || d_[i_] != '"') Fail("expected a string key");
        std::string key = ParseString();
        for (const auto& kv : v.object)
          if (kv.first == key) Fail("duplicate key \"" + key + "\"");
        SkipWs();
        if (i_ >= n_ || d_[i_] != ':') Fail("expected ':'");
        ++i_;
        SkipWs();
        Value item = ParseValue(depth + 1);
        v.object.emplace_back(std::move(key), std::move(item));
        SkipWs();
        if (i_ < n_ && d_[i_] == ',') {
          ++i_;
          continue;
        }
        if (i_ < n_ && d_[i_] == '}') {
          ++i_;
          return v;
        }
        Fail("expected ',' or '}'");
      }
    }
    if (c == '[') {
      v.kind = Value::Kind::Array;
      ++i_;
      SkipWs();
      if (i_ < n_ && d_[i_] == ']') {
        ++i_;
        return v;
      }
      for (;;) {
        SkipWs();
        v.array.push_back(ParseValue(depth + 1));
        SkipWs();
        if (i_ < n_ && d_[i_] == ',') {
          ++i_;
          continue;
        }
        if (i_ < n_ && d_[i_] == ']') {
          ++i_;
          return v;
        }
        Fail("expected ',' or ']'");
      }
    }
    if (c == '"') {
      v.kind = Value::Kind::String;
      v.string = ParseString();
      return v;
    }
    if (Consume("true")) {
      v.kind = Value::Kind::Bool;
      v.boolean = true;
      return v;
    }
    if (Consume("false")) {
      v.kind = Value::Kind::Bool;
      return v;
    }
    if (Consume("null")) return v;
    if (c == '-' || (c >= '0' && c <= '9')) return ParseNumber();
    Fail(std::string("unexpected character '") + c + "'");
  }

  Value ParseNumber() {
    size_t start = i_;
    bool integral = true;
    if (d_[i_] == '-') ++i_;
    if (i_ >= n_) Fail("bad number");
    if (d_[i_] == '0') {
      ++i_;
    } else if (d_[i_] >= '1' && d_[i_] <= '9') {
      while (i_ < n_ && d_[i_] >= '0' && d_[i_] <= '9') ++i_;
    } else {
      Fail("bad number");
    }
    if (i_ < n_ && d_[i_] == '.') {
      integral = false;
      ++i_;
      if (i_ >= n_ || d_[i_] < '0' || d_[i_] > '9') Fail("bad number");
      while (i_ < n_ && d_[i_] >= '0' && d_[i_] <= '9') ++i_;
    }
    if (i_ < n_ && (d_[i_] == 'e' || d_[i_] == 'E')) {
      integral = false;
      ++i_;
      if (i_ < n_ && (d_[i_] == '+' || d_[i_] == '-')) ++i_;
      if (i_ >= n_ || d_[i_] < '0' || d_[i_] > '9') Fail("bad number");
      while (i_ < n_ && d_[i_] >= '0' && d_[i_] <= '9') ++i_;
    }
    std::string text(d_ + start, i_ - start);
    Value v;
    v.kind = Value::Kind::Number;
    v.number = std::strtod(text.c_str(), nullptr);
    if (integral) {
      errno = 0;
      long long x = std::strtoll(text.c_str(), nullptr, 10);
      if (errno == 0) {
        v.isInteger = true;
        v.integer = x;
      }
    }
    return v;
  }

  static void AppendUtf8(std::string& out, uint32_t cp) {
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xC0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xE0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (cp >> 18));
      out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }

  uint32_t Hex4() {
    if (n_ - i_ < 4) Fail("truncated \\u escape");
    uint32_t cp = 0;
    for (int k = 0; k < 4; ++k) {
      char h = d_[i_++];
      cp <<= 4;
      if (h >= '0' && h <= '9') cp |= h - '0';
      else if (h >= 'a' && h <= 'f') cp |= h - 'a' + 10;
      else if (h >= 'A' && h <= 'F') cp |= h - 'A' + 10;
      else Fail("bad \\u escape");
    }
    return cp;
  }

  std::string ParseString() {
    ++i_;  // opening quote
    std::string out;
    for (;;) {
      if (i_ >= n_) Fail("unterminated string");
      unsigned char c = static_cast<unsigned char>(d_[i_++]);
      if (c == '"') return out;
      if (c < 0x20) Fail("control character in string");
      if (c != '\\') {
        out += static_cast<char>(c);
        continue;
      }
      if (i_ >= n_) Fail("unterminated escape");
      char e = d_[i_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          uint32_t cp = Hex4();
          if (cp >= 0xD800 && cp <= 0xDBFF) {
            if (n_ - i_ < 2 || d_[i_] != '\\' || d_[i_ + 1] != 'u') Fail("unpaired surrogate");
            i_ += 2;
            uint32_t lo = Hex4();
            if (lo < 0xDC00 || lo > 0xDFFF) Fail("unpaired surrogate");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
            Fail("unpaired surrogate");
          }
          AppendUtf8(out, cp);
          break;
        }
        default: Fail(std::string("bad escape \\") + e);
      }
    }
  }

  const char* d_;
  size_t n_;
  size_t i_ = 0;
  int maxDepth_;
};

}  // namespace

Value Parse(const char* data, size_t size, int maxDepth) { return Parser(data, size, maxDepth).Document(); }

void AppendString(std::string& out, const std::string& s) {
  static const char* hex = "0123456789abcdef";
  out += '"';
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          out += "\\u00";
          out += hex[c >> 4];
          out += hex[c & 15];
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  out += '"';
}

}  // namespace cd::json
