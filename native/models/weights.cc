#include "models/weights.h"

#include <sstream>

#include "core/errors.h"
#include "core/pickle.h"
#include "core/safetensors.h"

namespace cd::models {

namespace {
std::string ShapeText(at::IntArrayRef s) {
  std::ostringstream o;
  o << '[';
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << ']';
  return o.str();
}

std::string List(const std::vector<std::string>& items, size_t max = 20) {
  std::string out;
  for (size_t i = 0; i < items.size() && i < max; ++i) out += "\n  " + items[i];
  if (items.size() > max) out += "\n  ... and " + std::to_string(items.size() - max) + " more";
  return out;
}
}  // namespace

Weights::Weights(std::vector<std::pair<std::string, at::Tensor>> tensors, std::string source)
    : source_(std::move(source)) {
  for (auto& [k, v] : tensors) tensors_[k] = std::move(v);
}

Weights Weights::FromFiles(const std::vector<std::string>& files, std::optional<at::ScalarType> dtype,
                           c10::Device device) {
  std::vector<std::pair<std::string, at::Tensor>> all;
  std::string source;
  for (const auto& f : files) {
    const bool isSafetensors = f.size() >= 12 && f.compare(f.size() - 12, 12, ".safetensors") == 0;
    if (isSafetensors) {
      safetensors::LoadOptions opts;
      opts.dtype = dtype;
      opts.device = device;
      for (auto& kv : safetensors::Load(f, opts).tensors) all.push_back(std::move(kv));
    } else {
      pickle::LoadOptions opts;
      opts.dtype = dtype;
      opts.device = device;
      auto doc = pickle::LoadTorchFile(f, opts);
      for (auto& kv : pickle::FlattenTensors(*doc)) all.push_back(std::move(kv));
    }
    source += (source.empty() ? "" : ", ") + f;
  }
  return Weights(std::move(all), source);
}

Weights::Scope Weights::Scope::sub(const std::string& name) const { return Scope(w_, prefix_ + name + "."); }

bool Weights::Scope::has(const std::string& name) const { return w_->tensors_.count(prefix_ + name) > 0; }

at::Tensor Weights::Scope::get(const std::string& name, at::IntArrayRef shape) const {
  const std::string key = prefix_ + name;
  auto it = w_->tensors_.find(key);
  if (it == w_->tensors_.end()) {
    w_->missing_.push_back(key + " " + ShapeText(shape));
    return at::Tensor();
  }
  w_->used_.insert(key);
  if (it->second.sizes() != shape) {
    w_->mismatched_.push_back(key + ": expected " + ShapeText(shape) + ", found " + ShapeText(it->second.sizes()));
    return at::Tensor();
  }
  return it->second;
}

at::Tensor& Weights::at(const std::string& name) {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) throw Error("MODEL_WEIGHTS", "No weight named \"" + name + "\" in " + source_);
  return it->second;
}

void Weights::Finish() const {
  std::vector<std::string> unexpected;
  for (const auto& [k, v] : tensors_)
    if (!used_.count(k)) unexpected.push_back(k);
  if (missing_.empty() && unexpected.empty() && mismatched_.empty()) return;
  std::string msg = "The weights in " + source_ + " do not match the model's config.";
  if (!missing_.empty()) msg += "\nMissing keys (" + std::to_string(missing_.size()) + "):" + List(missing_);
  if (!unexpected.empty()) msg += "\nUnexpected keys (" + std::to_string(unexpected.size()) + "):" + List(unexpected);
  if (!mismatched_.empty()) msg += "\nShape mismatches (" + std::to_string(mismatched_.size()) + "):" + List(mismatched_);
  msg += "\nCheck that the config.json beside the weights belongs to them.";
  throw Error("MODEL_WEIGHTS", msg, {{"file", source_}});
}

}  // namespace cd::models
