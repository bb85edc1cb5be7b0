// Reading a diffusers/transformers config.json strictly: every key is either read, or known not
// to change the math (and listed as ignorable), or it is an error, so a config option we do not
// implement can never be silently ignored.
#pragma once

#include <set>
#include <string>
#include <vector>

#include "core/json.h"

namespace cd::models {

class ConfigReader {
 public:
  // Parses `text` (the config file's content); `file` names it in errors.
  ConfigReader(const std::string& text, std::string file);

  bool Has(const std::string& key) const;
  // Each getter marks the key as understood. A key that is present with the wrong type is an error;
  // null counts as absent.
  int Int(const std::string& key, int fallback);
  double Double(const std::string& key, double fallback);
  bool Bool(const std::string& key, bool fallback);
  std::string String(const std::string& key, const std::string& fallback);
  std::vector<int> Ints(const std::string& key, const std::vector<int>& fallback);
  std::vector<std::string> Strings(const std::string& key, const std::vector<std::string>& fallback);
  // An int, or a list with one entry per block (`count` entries); an int is repeated.
  std::vector<int> IntOrList(const std::string& key, int count, int fallback);
  // Requires a key to have a given value when present (e.g. an option we support only at its default).
  void Expect(const std::string& key, const std::string& valueAsJson, const std::string& why);

  // Keys that carry no meaning for the computation (bookkeeping such as "_class_name").
  void Ignore(std::initializer_list<const char*> keys);
  // Throws MODEL_CONFIG naming every key that was neither read nor ignored.
  void Finish() const;

  const std::string& file() const { return file_; }
  [[noreturn]] void Fail(const std::string& key, const std::string& what) const;

 private:
  const json::Value* Find(const std::string& key);
  json::Value root_;
  std::string file_;
  std::set<std::string> seen_;
};

}  // namespace cd::models
