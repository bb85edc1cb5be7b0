#include "models/config.h"

#include <cmath>

#include "core/errors.h"

namespace cd::models {

ConfigReader::ConfigReader(const std::string& text, std::string file) : file_(std::move(file)) {
  try {
    root_ = json::Parse(text.data(), text.size());
  } catch (const json::ParseError& e) {
    throw Error("MODEL_CONFIG", "The config " + file_ + " is not valid JSON (" + e.what() + ")", {{"file", file_}});
  }
  if (root_.kind != json::Value::Kind::Object)
    throw Error("MODEL_CONFIG", "The config " + file_ + " is not a JSON object", {{"file", file_}});
}

void ConfigReader::Fail(const std::string& key, const std::string& what) const {
  throw Error("MODEL_CONFIG", "In " + file_ + ", \"" + key + "\": " + what, {{"file", file_}});
}

bool ConfigReader::Has(const std::string& key) const {
  const json::Value* v = root_.find(key);
  return v && v->kind != json::Value::Kind::Null;
}

const json::Value* ConfigReader::Find(const std::string& key) {
  seen_.insert(key);
  const json::Value* v = root_.find(key);
  return v && v->kind != json::Value::Kind::Null ? v : nullptr;
}

int ConfigReader::Int(const std::string& key, int fallback) {
  const json::Value* v = Find(key);
  if (!v) return fallback;
  if (v->kind != json::Value::Kind::Number || !v->isInteger) Fail(key, "expected an integer");
  return static_cast<int>(v->integer);
}

double ConfigReader::Double(const std::string& key, double fallback) {
  const json::Value* v = Find(key);
  if (!v) return fallback;
  if (v->kind != json::Value::Kind::Number) Fail(key, "expected a number");
  return v->number;
}

bool ConfigReader::Bool(const std::string& key, bool fallback) {
  const json::Value* v = Find(key);
  if (!v) return fallback;
  if (v->kind != json::Value::Kind::Bool) Fail(key, "expected true or false");
  return v->boolean;
}

std::string ConfigReader::String(const std::string& key, const std::string& fallback) {
  const json::Value* v = Find(key);
  if (!v) return fallback;
  if (v->kind != json::Value::Kind::String) Fail(key, "expected a string");
  return v->string;
}

std::vector<int> ConfigReader::Ints(const std::string& key, const std::vector<int>& fallback) {
  const json::Value* v = Find(key);
  if (!v) return fallback;
  if (v->kind != json::Value::Kind::Array) Fail(key, "expected a list of integers");
  std::vector<int> out;
  for (const auto& x : v->array) {
    if (x.kind != json::Value::Kind::Number || !x.isInteger) Fail(key, "expected a list of integers");
    out.push_back(static_cast<int>(x.integer));
  }
  return out;
}

std::vector<std::string> ConfigReader::Strings(const std::string& key, const std::vector<std::string>& fallback) {
  const json::Value* v = Find(key);
  if (!v) return fallback;
  if (v->kind != json::Value::Kind::Array) Fail(key, "expected a list of strings");
  std::vector<std::string> out;
  for (const auto& x : v->array) {
    if (x.kind != json::Value::Kind::String) Fail(key, "expected a list of strings");
    out.push_back(x.string);
  }
  return out;
}

std::vector<int> ConfigReader::IntOrList(const std::string& key, int count, int fallback) {
  const json::Value* v = Find(key);
  if (!v) return std::vector<int>(count, fallback);
  if (v->kind == json::Value::Kind::Number && v->isInteger) return std::vector<int>(count, static_cast<int>(v->integer));
  std::vector<int> out = Ints(key, {});
  if (static_cast<int>(out.size()) != count)
    Fail(key, "expected one entry per block (" + std::to_string(count) + "), got " + std::to_string(out.size()));
  return out;
}

void ConfigReader::Expect(const std::string& key, const std::string& valueAsJson, const std::string& why) {
  const json::Value* v = Find(key);
  if (!v) return;
  json::Value want = json::Parse(valueAsJson.data(), valueAsJson.size());
  bool same = false;
  if (want.kind == v->kind) {
    switch (want.kind) {
      case json::Value::Kind::Bool: same = want.boolean == v->boolean; break;
      case json::Value::Kind::Number: same = want.number == v->number; break;
      case json::Value::Kind::String: same = want.string == v->string; break;
      default: same = false;
    }
  }
  if (!same) Fail(key, "only " + valueAsJson + " is supported (" + why + ")");
}

void ConfigReader::Ignore(std::initializer_list<const char*> keys) {
  for (const char* k : keys) seen_.insert(k);
}

void ConfigReader::Finish() const {
  std::vector<std::string> unknown;
  for (const auto& [k, v] : root_.object)
    if (!seen_.count(k) && !(k.size() > 1 && k[0] == '_')) unknown.push_back(k);
  if (unknown.empty()) return;
  std::string list;
  for (const auto& k : unknown) list += (list.empty() ? "" : ", ") + ("\"" + k + "\"");
  throw Error("MODEL_CONFIG",
              "The config " + file_ + " sets options this library does not implement: " + list +
                  ". They could change the computation, so the model is refused rather than run differently.",
              {{"file", file_}});
}

}  // namespace cd::models
