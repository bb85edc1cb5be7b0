// Reading torch.save files (`.bin`, `.ckpt`, `.pt`: a ZIP archive holding `<name>/data.pkl`, a
// pickle, and `<name>/data/<key>`, the raw little-endian bytes of each storage) without Python and
// without executing anything.
//
// The unpickler implements the opcodes of pickle protocols 2 to 5 that a tensor state dict (and the
// harmless non-tensor parts of Lightning checkpoints) use. It never calls anything: a GLOBAL merely
// names something, and the few names we give meaning to (collections.OrderedDict, the
// torch._utils._rebuild_* functions, storage classes, torch dtypes, _codecs.encode, builtins.set,
// ...) are implemented here in C++. Any other name becomes an inert Opaque value, except names that
// exist to run code (os.system, builtins.eval/exec/getattr/__import__, subprocess.*, ...), which
// are refused outright with PICKLE_UNSAFE: a file that mentions them was made to attack a Python
// loader, and no part of it should be trusted. Every size, depth and count is bounded; a
// violation is PICKLE_FORMAT, naming the file and the byte offset in the pickle.
//
// Knows nothing of Node, so fuzzers and tests can link it alone.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace cd::pickle {

struct Limits {
  size_t maxDepth = 512;              // container nesting (and open MARKs)
  size_t maxStack = 4u << 20;         // values on the unpickler's stack
  size_t maxMemo = 4u << 20;          // memo entries
  size_t maxValues = 4u << 20;        // values created while unpickling (an SD checkpoint needs ~20k)
  size_t maxSlots = 16u << 20;        // container elements created in all (copies included)
  size_t maxTreeNodes = 8u << 20;     // nodes of the result tree, shared subtrees counted each time seen
  uint64_t maxString = 256ull << 20;  // bytes in one string or bytes object
  uint64_t maxPickle = 2ull << 30;    // bytes in data.pkl
  size_t maxDims = 64;                // tensor rank
};

// A node of the result tree. Containers point at other nodes of the same Document; a node may be
// reached along several paths (the pickle memo shares objects, e.g. tied weights), never in a cycle.
struct Value {
  enum class Kind : uint8_t {
    None, Bool, Int, Float, String, Bytes, Tensor, List, Tuple, Dict, Opaque,
    // Only while unpickling; the finished document holds Opaque and Tensor in their place.
    Global, Storage,
  };
  Kind kind = Kind::None;
  bool boolean = false;
  int64_t integer = 0;
  double number = 0;
  std::string text;  // String and Bytes payload; the qualified name of Opaque and Global
  at::Tensor tensor;
  std::vector<Value*> items;                   // List, Tuple
  std::vector<std::pair<Value*, Value*>> dict;  // Dict, in insertion order
  // Storage only: the dtype of a typed storage (kByte for UntypedStorage) and the storage itself.
  at::ScalarType storageType = at::kByte;
  std::string storageClass;
  int64_t storageNumel = 0;
  c10::Storage storage;
  // Dict only: position of each str/int key in `dict`, so a repeated key replaces its value.
  std::unique_ptr<std::unordered_map<std::string, size_t>> keyIndex;
  // Bookkeeping of the validation walk (cycle detection, subtree size and height).
  uint8_t visit = 0;
  uint32_t height = 0;
  uint64_t subtreeNodes = 0;

  bool isContainer() const { return kind == Kind::List || kind == Kind::Tuple || kind == Kind::Dict; }
};

const char* KindName(Value::Kind k);

// The unpickled object and the arena that owns every node of it.
struct Document {
  std::deque<Value> arena;
  Value* root = nullptr;
  std::string file;
};

// Resolves a persistent id ('storage', storage class, key, location, numel) to the bytes of
// `<archive>/data/<key>`; returns the storage (aliasing the file when possible) or throws.
using StorageResolver = std::function<c10::Storage(const std::string& key, uint64_t nbytes)>;

struct UnpickleOptions {
  Limits limits;
  StorageResolver storages;  // when empty, any persistent id is an error
};

// Unpickles `size` bytes and validates the result (Finish). Throws cd::Error PICKLE_FORMAT or
// PICKLE_UNSAFE with props {file, offset?, global?}.
std::shared_ptr<Document> Unpickle(const uint8_t* data, uint64_t size, const std::string& file,
                                   const UnpickleOptions& options);

struct LoadOptions {
  std::optional<at::ScalarType> dtype;  // convert floating-point tensors to this dtype
  c10::Device device = c10::Device(c10::kCPU);
  Limits limits;
};

// Loads a torch.save zip archive. CPU tensors of the file's dtype alias the memory-mapped file
// (copy-on-write) and keep views: two tensors saved as views of one storage still share it.
std::shared_ptr<Document> LoadTorchFile(const std::string& path, const LoadOptions& options);
// The same from bytes in memory (for fuzzing and tests); `owner` keeps them alive.
std::shared_ptr<Document> LoadTorchBytes(const uint8_t* data, uint64_t size, const std::string& file,
                                         const LoadOptions& options, std::shared_ptr<const void> owner = nullptr);

// A dict key as text: str as is, int in decimal, and a readable description for anything else
// (None, bools, floats, tuples, opaque class names) so that such keys still survive into JS.
std::string KeyText(const Value& key);

// Every tensor reachable through nested dicts, named by the dotted path of keys
// ("unet.down_blocks.0....to_k.weight", "state_dict.model.diffusion_model...."), in file order.
// Lists, tuples and opaque values are not entered. A tensor at the root is named "". Throws
// PICKLE_FORMAT when two different tensors get the same name.
std::vector<std::pair<std::string, at::Tensor>> FlattenTensors(const Document& doc);

}  // namespace cd::pickle
