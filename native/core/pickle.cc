#include "core/pickle.h"

#include <algorithm>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <unordered_set>

#include "core/errors.h"
#include "core/zip_reader.h"

namespace cd::pickle {

namespace {

using Kind = Value::Kind;

// ---------------------------------------------------------------------------------------------
// Which globals a file may name.

// Modules (and attributes, by full dotted prefix) that exist to run code, reach the file system or
// the network, or load further pickles. Naming any of them is refused outright: Python's pickle would
// call them, and a file that does so was made to attack that loader.
constexpr const char* kRefusedPrefixes[] = {
    "os", "posix", "nt", "subprocess", "_posixsubprocess", "sys", "builtins", "__builtins__", "importlib", "imp",
    "runpy", "pty", "shutil", "socket", "socketserver", "ssl", "http", "urllib", "urllib2", "urllib3", "httplib",
    "ftplib", "smtplib", "poplib", "imaplib", "telnetlib", "requests", "xmlrpc", "webbrowser", "pickle", "_pickle",
    "cPickle", "pickletools", "dill", "cloudpickle", "joblib", "marshal", "shelve", "dbm", "types", "ctypes",
    "_ctypes", "cffi", "code", "codeop", "compileall", "py_compile", "platform", "multiprocessing",
    "_multiprocessing", "concurrent", "asyncio", "signal", "tempfile", "glob", "io", "_io", "fileinput", "zipimport",
    "pkgutil", "site", "sysconfig", "distutils", "setuptools", "pip", "ensurepip", "venv", "inspect", "pydoc", "timeit",
    "cProfile", "profile", "pdb", "bdb", "trace", "threading", "_thread", "functools", "_functools", "operator",
    "_operator", "gc", "atexit", "select", "selectors", "mmap", "resource", "fcntl", "termios", "tty", "pwd", "grp",
    "spwd", "crypt", "tkinter", "turtle", "idlelib", "sqlite3", "logging", "zipfile", "tarfile", "uuid", "ensurepip",
    "numpy.f2py", "numpy.distutils", "numpy.testing", "numpy.ctypeslib", "numpy.load", "numpy.loadtxt",
    "numpy.fromfile", "numpy.save", "numpy.savez", "numpy.savetxt", "numpy.lib.npyio", "numpy.lib.format",
    "torch.load", "torch.save", "torch.compile", "torch.hub", "torch.jit", "torch._C", "torch.ops", "torch._ops",
    "torch.classes", "torch._classes", "torch.library", "torch.utils.cpp_extension", "torch.serialization.load",
    "torch.serialization._load", "torch.serialization._legacy_load", "torch.serialization.save",
    "torch.package", "torch._dynamo", "torch._inductor", "torch.fx", "torch.multiprocessing", "torch.distributed",
    "torch.storage._load_from_bytes", "torch.backends",
};

// Builtins that only build plain data (they are never called here either; a few are implemented).
const std::unordered_set<std::string>& HarmlessBuiltins() {
  static const std::unordered_set<std::string> s = {
      "set", "frozenset", "bytes", "bytearray", "list", "tuple", "dict", "str", "int", "float", "bool", "complex",
      "slice", "range", "object", "NoneType", "Ellipsis", "NotImplemented",
  };
  return s;
}

// Python resolves a dotted name attribute by attribute, so "torch.os.system" is os.system (torch
// imports os): these roots and these final names are refused wherever they appear in a name.
constexpr const char* kRefusedAnywhere[] = {
    "os", "posix", "nt", "subprocess", "_posixsubprocess", "sys", "builtins", "importlib", "runpy", "pty",
    "shutil", "socket", "pickle", "_pickle", "marshal", "ctypes", "multiprocessing", "webbrowser",
};
constexpr const char* kRefusedNames[] = {
    "system", "popen", "popen2", "popen3", "popen4", "eval", "exec", "execfile", "execl", "execle", "execlp",
    "execv", "execve", "execvp", "execvpe", "spawnl", "spawnle", "spawnlp", "spawnv", "spawnve", "spawnvp",
    "getattr", "setattr", "delattr", "check_output", "check_call", "run_path", "run_module", "load_module",
    "import_module",
};

bool HasPrefix(const std::string& full, const char* prefix) {
  const size_t n = std::strlen(prefix);
  return full.compare(0, n, prefix) == 0 && (full.size() == n || full[n] == '.');
}

bool IsDunder(const std::string& part) {
  return part.size() > 4 && part.compare(0, 2, "__") == 0 && part.compare(part.size() - 2, 2, "__") == 0;
}

// Empty when the global may be named; otherwise why it is refused.
std::string RefusalReason(const std::string& module, const std::string& name) {
  const std::string full = module + "." + name;
  if (module == "builtins") {
    if (HarmlessBuiltins().count(name)) return {};
    return "builtins." + name + " can run code or reach outside the file when Python unpickles it";
  }
  for (const char* p : kRefusedPrefixes)
    if (HasPrefix(full, p)) return full + " can run code or reach outside the file when Python unpickles it";
  for (size_t at = full.find('.'); at != std::string::npos; at = full.find('.', at + 1)) {
    const std::string rest = full.substr(at + 1);
    for (const char* p : kRefusedAnywhere)
      if (HasPrefix(rest, p)) return full + " reaches " + p + " through an attribute, which can run code";
  }
  {
    const size_t dot = full.rfind('.');
    const std::string last = full.substr(dot + 1);
    for (const char* n : kRefusedNames)
      if (last == n) return full + " is named like a function that runs code";
  }
  // Dunder attributes (__globals__, __getattribute__, __import__, __reduce__, ...) are how pickle
  // exploits climb from a harmless object to a dangerous one.
  size_t start = 0;
  while (start <= name.size()) {
    size_t dot = name.find('.', start);
    if (dot == std::string::npos) dot = name.size();
    const std::string part = name.substr(start, dot - start);
    if (IsDunder(part) && !(module == "copyreg" && (part == "__newobj__" || part == "__newobj_ex__")))
      return full + " reaches a special (dunder) attribute, a way to escape to arbitrary code";
    start = dot + 1;
  }
  start = 0;
  while (start <= module.size()) {
    size_t dot = module.find('.', start);
    if (dot == std::string::npos) dot = module.size();
    const std::string part = module.substr(start, dot - start);
    if (IsDunder(part) && part != "__main__") return full + " names a special (dunder) module";
    start = dot + 1;
  }
  return {};
}

// Storage classes named in persistent ids, with the element type of a typed storage.
struct StorageClass {
  const char* name;
  at::ScalarType type;
};
constexpr StorageClass kStorageClasses[] = {
    {"DoubleStorage", at::kDouble}, {"FloatStorage", at::kFloat},       {"HalfStorage", at::kHalf},
    {"BFloat16Storage", at::kBFloat16}, {"LongStorage", at::kLong},     {"IntStorage", at::kInt},
    {"ShortStorage", at::kShort},   {"CharStorage", at::kChar},         {"ByteStorage", at::kByte},
    {"BoolStorage", at::kBool},     {"UntypedStorage", at::kByte},
};

// torch dtypes as pickled (torch.dtype reduces to the attribute name), for _rebuild_tensor_v3.
struct DtypeGlobal {
  const char* name;
  at::ScalarType type;
};
constexpr DtypeGlobal kDtypeGlobals[] = {
    {"torch.float32", at::kFloat},  {"torch.float", at::kFloat},      {"torch.float16", at::kHalf},
    {"torch.half", at::kHalf},      {"torch.bfloat16", at::kBFloat16}, {"torch.float64", at::kDouble},
    {"torch.double", at::kDouble},  {"torch.int64", at::kLong},        {"torch.long", at::kLong},
    {"torch.int32", at::kInt},      {"torch.int", at::kInt},           {"torch.int16", at::kShort},
    {"torch.short", at::kShort},    {"torch.int8", at::kChar},         {"torch.uint8", at::kByte},
    {"torch.bool", at::kBool},      {"torch.float8_e4m3fn", at::kFloat8_e4m3fn},
    {"torch.float8_e5m2", at::kFloat8_e5m2},
};

std::string Hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "0x%" PRIx64, v);
  return buf;
}

// ---------------------------------------------------------------------------------------------
// Opcodes (Lib/pickle.py names).
enum Op : uint8_t {
  MARK = '(', STOP = '.', POP = '0', POP_MARK = '1', DUP = '2', FLOAT = 'F', INT = 'I', BININT = 'J',
  BININT1 = 'K', LONG = 'L', BININT2 = 'M', NONE = 'N', PERSID = 'P', BINPERSID = 'Q', REDUCE = 'R',
  STRING = 'S', BINSTRING = 'T', SHORT_BINSTRING = 'U', UNICODE = 'V', BINUNICODE = 'X', APPEND = 'a',
  BUILD = 'b', GLOBAL = 'c', DICT = 'd', EMPTY_DICT = '}', APPENDS = 'e', GET = 'g', BINGET = 'h', INST = 'i',
  LONG_BINGET = 'j', LIST = 'l', EMPTY_LIST = ']', OBJ = 'o', PUT = 'p', BINPUT = 'q', LONG_BINPUT = 'r',
  SETITEM = 's', TUPLE = 't', EMPTY_TUPLE = ')', SETITEMS = 'u', BINFLOAT = 'G',
  PROTO = 0x80, NEWOBJ = 0x81, EXT1 = 0x82, EXT2 = 0x83, EXT4 = 0x84, TUPLE1 = 0x85, TUPLE2 = 0x86,
  TUPLE3 = 0x87, NEWTRUE = 0x88, NEWFALSE = 0x89, LONG1 = 0x8a, LONG4 = 0x8b,
  SHORT_BINUNICODE = 0x8c, BINUNICODE8 = 0x8d, BINBYTES8 = 0x8e, EMPTY_SET = 0x8f, ADDITEMS = 0x90,
  FROZENSET = 0x91, NEWOBJ_EX = 0x92, STACK_GLOBAL = 0x93, MEMOIZE = 0x94, FRAME = 0x95, BYTEARRAY8 = 0x96,
  NEXT_BUFFER = 0x97, READONLY_BUFFER = 0x98, SHORT_BINBYTES = 'C', BINBYTES = 'B',
};

// ---------------------------------------------------------------------------------------------

class Unpickler {
 public:
  Unpickler(const uint8_t* data, uint64_t size, const std::string& file, const UnpickleOptions& o, Document& doc)
      : data_(data), size_(size), file_(file), opt_(o), L_(o.limits), doc_(doc) {}

  Value* Run() {
    if (size_ > L_.maxPickle)
      Fail("the pickle is " + std::to_string(size_) + " bytes, more than the limit of " +
           std::to_string(L_.maxPickle));
    while (pos_ < size_) {
      at_ = pos_;
      const uint8_t op = data_[pos_++];
      if (op == STOP) return Stop();
      Step(op);
    }
    at_ = pos_;
    Fail("the pickle ends without a STOP opcode (is the file truncated?)");
  }

 private:
  // -- errors ---------------------------------------------------------------------------------
  [[noreturn]] void Fail(const std::string& what) const {
    throw Error("PICKLE_FORMAT",
                "Invalid torch file " + file_ + ": " + what + " (at byte " + std::to_string(at_) + " of the pickle)",
                {{"file", file_}, {"offset", std::to_string(at_)}});
  }
  [[noreturn]] void Unsafe(const std::string& global, const std::string& why) const {
    throw Error("PICKLE_UNSAFE",
                "Refused to load " + file_ + ": its pickle names the global " + global + " (at byte " +
                    std::to_string(at_) + "), and " + why +
                    ". Only tensor state dicts can be loaded; if you trust the file's origin, re-save its "
                    "tensors as safetensors.",
                {{"file", file_}, {"offset", std::to_string(at_)}, {"global", global}});
  }

  // -- input ----------------------------------------------------------------------------------
  const uint8_t* Take(uint64_t n, const char* what) {
    if (n > size_ - pos_)
      Fail(std::string("the pickle ends inside ") + what + " (" + std::to_string(n) + " bytes needed, " +
           std::to_string(size_ - pos_) + " left; is the file truncated?)");
    const uint8_t* p = data_ + pos_;
    pos_ += n;
    return p;
  }
  uint64_t ReadLE(int n, const char* what) {
    const uint8_t* p = Take(static_cast<uint64_t>(n), what);
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; --i) v = (v << 8) | p[i];
    return v;
  }
  uint64_t Length(int n, const char* what) {
    const uint64_t len = ReadLE(n, what);
    if (len > L_.maxString)
      Fail(std::string(what) + " of " + std::to_string(len) + " bytes exceeds the limit of " +
           std::to_string(L_.maxString));
    return len;
  }
  std::string Line(const char* what) {
    const uint64_t maxLen = 512;
    const uint64_t end = std::min(size_, pos_ + maxLen + 1);
    for (uint64_t i = pos_; i < end; ++i) {
      if (data_[i] == '\n') {
        std::string s(reinterpret_cast<const char*>(data_ + pos_), i - pos_);
        pos_ = i + 1;
        return s;
      }
    }
    Fail(std::string(what) + " is not a newline-terminated line of at most 512 bytes");
  }

  // -- values ---------------------------------------------------------------------------------
  Value* New(Kind k) {
    if (doc_.arena.size() >= L_.maxValues)
      Fail("the pickle creates more than " + std::to_string(L_.maxValues) + " values");
    doc_.arena.emplace_back();
    Value* v = &doc_.arena.back();
    v->kind = k;
    return v;
  }
  Value* NewInt(int64_t i) {
    Value* v = New(Kind::Int);
    v->integer = i;
    return v;
  }
  // Containers can be filled from shared (memoized) ones for a few bytes each; count every slot.
  void Charge(size_t n) {
    slots_ += n;
    if (slots_ > L_.maxSlots)
      Fail("the pickle builds containers of more than " + std::to_string(L_.maxSlots) + " elements in all");
  }
  Value* NewText(Kind k, std::string s) {
    Value* v = New(k);
    v->text = std::move(s);
    return v;
  }

  // -- stack ----------------------------------------------------------------------------------
  size_t Base() const { return marks_.empty() ? 0 : marks_.back(); }
  void Push(Value* v) {
    if (stack_.size() >= L_.maxStack) Fail("the stack grows beyond " + std::to_string(L_.maxStack) + " values");
    stack_.push_back(v);
  }
  Value* Pop(const char* op) {
    if (stack_.size() <= Base())
      Fail(std::string(op) + (marks_.empty() ? " pops from an empty stack" : " pops past a MARK"));
    Value* v = stack_.back();
    stack_.pop_back();
    return v;
  }
  Value* Top(const char* op) {
    if (stack_.size() <= Base())
      Fail(std::string(op) + (marks_.empty() ? " needs a value but the stack is empty" : " reaches past a MARK"));
    return stack_.back();
  }
  std::vector<Value*> PopMark(const char* op) {
    if (marks_.empty()) Fail(std::string(op) + " needs a MARK but none is open");
    const size_t base = marks_.back();
    marks_.pop_back();
    std::vector<Value*> items(stack_.begin() + static_cast<std::ptrdiff_t>(base), stack_.end());
    stack_.resize(base);
    return items;
  }

  void Memo(uint64_t index, const char* op) {
    Value* v = Top(op);
    auto it = memo_.find(index);
    if (it != memo_.end()) {
      it->second = v;
      return;
    }
    if (memo_.size() >= L_.maxMemo) Fail("the memo grows beyond " + std::to_string(L_.maxMemo) + " entries");
    memo_.emplace(index, v);
  }
  Value* Recall(uint64_t index) {
    auto it = memo_.find(index);
    if (it == memo_.end()) Fail("memo index " + std::to_string(index) + " was never stored (memo out of range)");
    return it->second;
  }

  // -- containers -----------------------------------------------------------------------------
  Value* Tuple(std::vector<Value*> items) {
    Charge(items.size());
    Value* v = New(Kind::Tuple);
    v->items = std::move(items);
    return v;
  }

  static std::string KeyId(const Value* k) {
    switch (k->kind) {
      case Kind::String: return "s" + k->text;
      case Kind::Int: return "i" + std::to_string(k->integer);
      case Kind::Bool: return k->boolean ? "i1" : "i0";
      default: return {};
    }
  }

  void SetItem(Value* dict, Value* key, Value* value) {
    Charge(2);
    if (key->kind == Kind::List || key->kind == Kind::Dict)
      Fail(std::string("a dict key is a ") + KindName(key->kind) + ", which is unhashable");
    const std::string id = KeyId(key);
    if (!id.empty()) {
      if (!dict->keyIndex) dict->keyIndex = std::make_unique<std::unordered_map<std::string, size_t>>();
      auto [it, inserted] = dict->keyIndex->emplace(id, dict->dict.size());
      if (!inserted) {  // Python keeps the first key's position and the last value
        dict->dict[it->second].second = value;
        return;
      }
    }
    dict->dict.emplace_back(key, value);
  }

  void SetItems(Value* target, const std::vector<Value*>& kv, const char* op) {
    if (kv.size() % 2) Fail(std::string(op) + " has an odd number of items above its MARK");
    if (target->kind == Kind::Opaque) return;  // a dict subclass we do not model: its items are dropped
    if (target->kind != Kind::Dict) Fail(std::string(op) + " on a " + KindName(target->kind) + ", not a dict");
    for (size_t i = 0; i < kv.size(); i += 2) SetItem(target, kv[i], kv[i + 1]);
  }

  void Append(Value* target, const std::vector<Value*>& items, const char* op) {
    if (target->kind == Kind::Opaque) return;
    if (target->kind != Kind::List) Fail(std::string(op) + " on a " + KindName(target->kind) + ", not a list");
    Charge(items.size());
    target->items.insert(target->items.end(), items.begin(), items.end());
  }

  // The elements of a list/tuple argument (set(), OrderedDict([...]), ...).
  const std::vector<Value*>* Sequence(const Value* v) const {
    return (v->kind == Kind::List || v->kind == Kind::Tuple) ? &v->items : nullptr;
  }

  // -- globals --------------------------------------------------------------------------------
  Value* Global(std::string module, std::string name) {
    auto valid = [](const std::string& s) {
      if (s.empty()) return false;
      for (char c : s)
        if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '.')) return false;
      return true;
    };
    if (!valid(module) || !valid(name))
      Fail("a GLOBAL names \"" + module.substr(0, 100) + "\" \"" + name.substr(0, 100) +
           "\", which is not a dotted Python name");
    // Python 2 spellings that protocol-2 pickles use (pickle's fix_imports).
    if (module == "__builtin__") module = "builtins";
    if (module == "copy_reg") module = "copyreg";
    const std::string why = RefusalReason(module, name);
    if (!why.empty()) Unsafe(module + "." + name, why);
    return NewText(Kind::Global, module + "." + name);
  }

  // -- persistent ids -------------------------------------------------------------------------
  Value* PersistentLoad(Value* pid) {
    const auto* t = pid->kind == Kind::Tuple ? &pid->items : nullptr;
    if (!t || t->size() != 5 || (*t)[0]->kind != Kind::String || (*t)[0]->text != "storage")
      Fail("a persistent id is not a ('storage', class, key, location, numel) tuple");
    const Value* cls = (*t)[1];
    const Value* key = (*t)[2];
    const Value* location = (*t)[3];
    const Value* numel = (*t)[4];
    if (cls->kind != Kind::Global) Fail("a persistent id's storage class is not a global");
    std::string shortName;
    if (HasPrefix(cls->text, "torch.cuda")) shortName = cls->text.substr(std::strlen("torch.cuda."));
    else if (HasPrefix(cls->text, "torch.storage")) shortName = cls->text.substr(std::strlen("torch.storage."));
    else if (HasPrefix(cls->text, "torch")) shortName = cls->text.substr(std::strlen("torch."));
    const StorageClass* sc = nullptr;
    for (const auto& c : kStorageClasses)
      if (shortName == c.name) sc = &c;
    if (!sc)
      Fail("storage class " + cls->text +
           " is not supported (only float64/32/16, bfloat16, int64/32/16/8, uint8 and bool storages are)");
    if (key->kind != Kind::String || key->text.empty() || key->text.size() > 256 ||
        key->text.find('/') != std::string::npos)
      Fail("a persistent id's storage key is not a short string");
    if (location->kind != Kind::String) Fail("a persistent id's location is not a string");
    if (numel->kind != Kind::Int || numel->integer < 0) Fail("a persistent id's element count is not a count");
    const size_t elem = c10::elementSize(sc->type);
    if (static_cast<uint64_t>(numel->integer) > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) / elem)
      Fail("storage \"" + key->text + "\" is too large");
    const uint64_t nbytes = static_cast<uint64_t>(numel->integer) * elem;

    auto it = storages_.find(key->text);
    if (it != storages_.end()) {
      Value* s = it->second;
      if (s->storageClass != shortName || s->storageNumel != numel->integer)
        Fail("storage \"" + key->text + "\" is described twice, as " + s->storageClass + "[" +
             std::to_string(s->storageNumel) + "] and " + shortName + "[" + std::to_string(numel->integer) + "]");
      return s;
    }
    if (!opt_.storages) Fail("the pickle refers to storage \"" + key->text + "\" but no archive holds storages");
    Value* s = New(Kind::Storage);
    s->storageType = sc->type;
    s->storageClass = shortName;
    s->storageNumel = numel->integer;
    s->text = key->text;
    s->storage = opt_.storages(key->text, nbytes);
    storages_.emplace(key->text, s);
    return s;
  }

  // -- tensors --------------------------------------------------------------------------------
  int64_t Int(const Value* v, const char* what) const {
    if (v->kind != Kind::Int) Fail(std::string(what) + " is a " + KindName(v->kind) + ", not an int");
    return v->integer;
  }
  std::vector<int64_t> IntSeq(const Value* v, const char* what) const {
    const auto* s = Sequence(v);
    if (!s) Fail(std::string(what) + " is a " + KindName(v->kind) + ", not a tuple of ints");
    if (s->size() > L_.maxDims)
      Fail(std::string(what) + " has " + std::to_string(s->size()) + " dimensions, more than " +
           std::to_string(L_.maxDims));
    std::vector<int64_t> out;
    for (const Value* x : *s) {
      const int64_t i = Int(x, what);
      if (i < 0) Fail(std::string(what) + " holds the negative value " + std::to_string(i));
      out.push_back(i);
    }
    return out;
  }

  Value* Tensor(const Value* storage, const Value* offsetV, const Value* sizeV, const Value* strideV,
                std::optional<at::ScalarType> dtype, const char* fn) {
    if (storage->kind != Kind::Storage)
      Fail(std::string(fn) + "'s storage argument is a " + KindName(storage->kind) + ", not a storage");
    const int64_t offset = Int(offsetV, "a tensor's storage offset");
    if (offset < 0) Fail("a tensor's storage offset is negative");
    const std::vector<int64_t> sizes = IntSeq(sizeV, "a tensor's size");
    const std::vector<int64_t> strides = IntSeq(strideV, "a tensor's stride");
    if (sizes.size() != strides.size())
      Fail("a tensor's size has " + std::to_string(sizes.size()) + " dimensions but its stride " +
           std::to_string(strides.size()));
    const at::ScalarType type = dtype.value_or(storage->storageType);
    const uint64_t item = c10::elementSize(type);
    const uint64_t nbytes = storage->storage.nbytes();
    // The last element the view touches must lie inside the storage: offset + Σ (size-1)·stride.
    bool empty = false;
    for (int64_t s : sizes) empty |= s == 0;
    uint64_t last = static_cast<uint64_t>(offset);
    bool overflow = false;
    if (!empty) {
      for (size_t d = 0; d < sizes.size(); ++d) {
        uint64_t step = 0;
        overflow |= __builtin_mul_overflow(static_cast<uint64_t>(sizes[d] - 1), static_cast<uint64_t>(strides[d]), &step);
        overflow |= __builtin_add_overflow(last, step, &last);
      }
    }
    uint64_t needed = 0;
    overflow |= __builtin_add_overflow(last, empty ? 0 : 1, &needed);
    overflow |= __builtin_mul_overflow(needed, item, &needed);
    overflow |= needed > static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
    if (overflow || needed > nbytes)
      Fail("a tensor of size " + c10::str(at::IntArrayRef(sizes)) + ", stride " + c10::str(at::IntArrayRef(strides)) +
           " and offset " + std::to_string(offset) + " (" + c10::toString(type) + ") reaches beyond its storage \"" +
           storage->text + "\" of " + std::to_string(nbytes) + " bytes");
    Value* v = New(Kind::Tensor);
    v->tensor = at::empty({0}, at::TensorOptions().dtype(type)).set_(storage->storage, offset, sizes, strides);
    return v;
  }

  // Calls an implemented global; nullptr when `fn` has no implementation (the result is opaque).
  Value* Call(const std::string& fn, const std::vector<Value*>& a) {
    auto arity = [&](size_t lo, size_t hi) {
      if (a.size() < lo || a.size() > hi)
        Fail(fn + " is called with " + std::to_string(a.size()) + " arguments; it takes " + std::to_string(lo) +
             (hi != lo ? " to " + std::to_string(hi) : std::string()));
    };
    if (fn == "collections.OrderedDict" || fn == "builtins.dict") {
      arity(0, 1);
      Value* d = New(Kind::Dict);
      if (a.size() == 1) {
        const auto* pairs = Sequence(a[0]);
        if (!pairs) Fail(fn + " is called with a " + std::string(KindName(a[0]->kind)) + ", not a list of pairs");
        for (const Value* p : *pairs) {
          const auto* kv = Sequence(p);
          if (!kv || kv->size() != 2) Fail(fn + " is called with an item that is not a (key, value) pair");
          SetItem(d, (*kv)[0], (*kv)[1]);
        }
      }
      return d;
    }
    if (fn == "builtins.set" || fn == "builtins.frozenset" || fn == "builtins.list" || fn == "builtins.tuple") {
      arity(0, 1);
      Value* l = New(fn == "builtins.tuple" ? Kind::Tuple : Kind::List);
      if (a.size() == 1) {
        const auto* s = Sequence(a[0]);
        if (!s) return nullptr;
        Charge(s->size());
        l->items = *s;
      }
      return l;
    }
    if (fn == "builtins.bytes" || fn == "builtins.bytearray") {
      if (a.empty()) return New(Kind::Bytes);
      if (a.size() == 1 && a[0]->kind == Kind::Bytes) return NewText(Kind::Bytes, a[0]->text);
      return nullptr;
    }
    if (fn == "_codecs.encode") {
      // Protocol 2 writes bytes as encode(<latin-1 text>, 'latin1').
      if (a.size() != 2 || a[0]->kind != Kind::String || a[1]->kind != Kind::String ||
          (a[1]->text != "latin1" && a[1]->text != "latin-1"))
        return nullptr;
      std::string out;
      const std::string& s = a[0]->text;
      for (size_t i = 0; i < s.size(); ++i) {
        const uint8_t c = static_cast<uint8_t>(s[i]);
        if (c < 0x80) {
          out.push_back(static_cast<char>(c));
        } else if ((c & 0xe0) == 0xc0 && i + 1 < s.size() && c <= 0xc3) {
          out.push_back(static_cast<char>(((c & 0x1f) << 6) | (static_cast<uint8_t>(s[i + 1]) & 0x3f)));
          ++i;
        } else {
          Fail("_codecs.encode is given text that latin-1 cannot encode");
        }
      }
      return NewText(Kind::Bytes, std::move(out));
    }
    if (fn == "torch.Size") {
      arity(1, 1);
      const auto* s = Sequence(a[0]);
      if (!s) Fail("torch.Size is called with a " + std::string(KindName(a[0]->kind)));
      return Tuple(*s);
    }
    if (fn == "torch._utils._rebuild_tensor") {
      arity(4, 4);
      return Tensor(a[0], a[1], a[2], a[3], std::nullopt, "_rebuild_tensor");
    }
    if (fn == "torch._utils._rebuild_tensor_v2") {
      // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata]); the hooks
      // (always an empty OrderedDict since torch 1.x) and metadata are not needed for inference.
      arity(6, 7);
      return Tensor(a[0], a[1], a[2], a[3], std::nullopt, "_rebuild_tensor_v2");
    }
    if (fn == "torch._utils._rebuild_tensor_v3") {
      // (storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype[, metadata]):
      // written for dtypes without a typed storage class (float8, uint16, ...), over an UntypedStorage.
      arity(7, 8);
      if (a[6]->kind != Kind::Global) Fail("_rebuild_tensor_v3's dtype is not a torch dtype");
      std::optional<at::ScalarType> type;
      for (const auto& d : kDtypeGlobals)
        if (a[6]->text == d.name) type = d.type;
      if (!type) Fail("tensors of dtype " + a[6]->text + " are not supported");
      return Tensor(a[0], a[1], a[2], a[3], type, "_rebuild_tensor_v3");
    }
    if (fn == "torch._utils._rebuild_parameter" || fn == "torch._utils._rebuild_parameter_with_state") {
      // nn.Parameter(data, requires_grad): for inference the data tensor is all that matters.
      arity(fn == "torch._utils._rebuild_parameter" ? 3 : 4, fn == "torch._utils._rebuild_parameter" ? 3 : 4);
      if (a[0]->kind != Kind::Tensor) Fail(fn + "'s data is a " + KindName(a[0]->kind) + ", not a tensor");
      return a[0];
    }
    if (fn == "torch._tensor._rebuild_from_type_v2") {
      // (func, new_type, args, state): a tensor (sub)class with Python attributes; rebuild the plain
      // tensor with func(*args) and drop the attributes.
      arity(4, 4);
      if (a[0]->kind != Kind::Global || a[2]->kind != Kind::Tuple)
        Fail("_rebuild_from_type_v2 is not given a rebuild function and an argument tuple");
      if (!HasPrefix(a[0]->text, "torch._utils") || a[0]->text.find("._rebuild_") == std::string::npos)
        Fail("_rebuild_from_type_v2 calls " + a[0]->text + ", which is not a tensor rebuild function");
      Value* r = Call(a[0]->text, a[2]->items);
      if (!r) Fail("_rebuild_from_type_v2 calls " + a[0]->text + ", which is not supported");
      return r;
    }
    if ((HasPrefix(fn, "torch._utils") || HasPrefix(fn, "torch._tensor")) && fn.find("._rebuild") != std::string::npos)
      Fail("the file holds a tensor rebuilt by " + fn +
           " (a sparse, quantized, nested, meta or device-specific tensor), which is not supported");
    return nullptr;
  }

  Value* Reduce(Value* callable, Value* args, const char* op) {
    if (args->kind != Kind::Tuple)
      Fail(std::string(op) + "'s arguments are a " + KindName(args->kind) + ", not a tuple");
    if (callable->kind == Kind::Opaque) return NewText(Kind::Opaque, callable->text);
    if (callable->kind != Kind::Global)
      Fail(std::string(op) + " calls a " + KindName(callable->kind) + ", which is not callable");
    if (Value* r = Call(callable->text, args->items)) return r;
    // Named but not implemented: never called, an inert placeholder stands in for its result.
    return NewText(Kind::Opaque, callable->text);
  }

  Value* NewObject(Value* cls, Value* args, const char* op) {
    if (args->kind != Kind::Tuple)
      Fail(std::string(op) + "'s arguments are a " + KindName(args->kind) + ", not a tuple");
    if (cls->kind != Kind::Global && cls->kind != Kind::Opaque)
      Fail(std::string(op) + " instantiates a " + KindName(cls->kind) + ", not a class");
    // cls.__new__(cls, *args) makes an empty object that SETITEMS/APPENDS/BUILD then fill.
    const std::string& n = cls->text;
    if (cls->kind == Kind::Global) {
      if (n == "collections.OrderedDict" || n == "builtins.dict") return New(Kind::Dict);
      if (n == "builtins.list" || n == "builtins.set") return New(Kind::List);
    }
    return NewText(Kind::Opaque, n);
  }

  // -- the interpreter ------------------------------------------------------------------------
  Value* Stop() {
    Value* result = Pop("STOP");
    if (!stack_.empty() || !marks_.empty())
      Fail("STOP leaves " + std::to_string(stack_.size()) + " values and " + std::to_string(marks_.size()) +
           " MARKs behind (unbalanced MARK)");
    return result;
  }

  void Step(uint8_t op) {
    switch (op) {
      case PROTO: {
        const uint64_t v = ReadLE(1, "PROTO");
        if (v > 5) Fail("pickle protocol " + std::to_string(v) + " is newer than protocol 5");
        return;
      }
      case FRAME: {
        const uint64_t n = ReadLE(8, "FRAME");
        if (n > size_ - pos_) Fail("a FRAME of " + std::to_string(n) + " bytes runs past the end of the pickle");
        return;
      }
      case MARK:
        if (marks_.size() >= L_.maxDepth) Fail("more than " + std::to_string(L_.maxDepth) + " MARKs are open");
        marks_.push_back(stack_.size());
        return;
      case POP:
        if (stack_.size() > Base()) stack_.pop_back();
        else if (!marks_.empty()) marks_.pop_back();  // Python pops the mark when the frame is empty
        else Fail("POP on an empty stack (stack underflow)");
        return;
      case POP_MARK: PopMark("POP_MARK"); return;
      case DUP: Push(Top("DUP")); return;
      case NONE: Push(New(Kind::None)); return;
      case NEWTRUE:
      case NEWFALSE: {
        Value* v = New(Kind::Bool);
        v->boolean = op == NEWTRUE;
        Push(v);
        return;
      }
      case BININT: Push(NewInt(static_cast<int32_t>(ReadLE(4, "BININT")))); return;
      case BININT1: Push(NewInt(static_cast<int64_t>(ReadLE(1, "BININT1")))); return;
      case BININT2: Push(NewInt(static_cast<int64_t>(ReadLE(2, "BININT2")))); return;
      case LONG1:
      case LONG4: {
        uint64_t n = op == LONG1 ? ReadLE(1, "LONG1") : ReadLE(4, "LONG4");
        if (op == LONG4 && n > 0x7fffffffu) Fail("LONG4 has a negative length");
        if (n > L_.maxString) Fail("an integer of " + std::to_string(n) + " bytes is too long");
        const uint8_t* p = Take(n, "a long integer");
        // Little-endian two's complement; keep it when it fits in 64 bits.
        const bool negative = n > 0 && (p[n - 1] & 0x80);
        bool fits = true;
        for (uint64_t i = 8; i < n; ++i) fits &= p[i] == (negative ? 0xff : 0x00);
        if (n > 8) fits &= ((p[7] & 0x80) != 0) == negative;
        if (!fits) {
          Push(NewText(Kind::Opaque, "builtins.int"));  // wider than 64 bits: not needed for tensors
          return;
        }
        uint64_t v = negative ? ~0ull : 0;
        for (uint64_t i = std::min<uint64_t>(n, 8); i-- > 0;) v = (v << 8) | p[i];
        Push(NewInt(static_cast<int64_t>(v)));
        return;
      }
      case BINFLOAT: {
        const uint8_t* p = Take(8, "BINFLOAT");
        uint64_t bits = 0;
        for (int i = 0; i < 8; ++i) bits = (bits << 8) | p[i];  // big-endian
        Value* v = New(Kind::Float);
        std::memcpy(&v->number, &bits, 8);
        Push(v);
        return;
      }
      case SHORT_BINUNICODE:
      case BINUNICODE:
      case BINUNICODE8:
      case SHORT_BINSTRING:
      case BINSTRING: {
        const int w = (op == SHORT_BINUNICODE || op == SHORT_BINSTRING) ? 1 : op == BINUNICODE8 ? 8 : 4;
        const uint64_t n = Length(w, "a string");
        if (op == BINSTRING && n > 0x7fffffffu) Fail("BINSTRING has a negative length");
        const uint8_t* p = Take(n, "a string");
        Push(NewText(Kind::String, std::string(reinterpret_cast<const char*>(p), n)));
        return;
      }
      case SHORT_BINBYTES:
      case BINBYTES:
      case BINBYTES8:
      case BYTEARRAY8: {
        const int w = op == SHORT_BINBYTES ? 1 : op == BINBYTES ? 4 : 8;
        const uint64_t n = Length(w, "a bytes object");
        const uint8_t* p = Take(n, "a bytes object");
        Push(NewText(Kind::Bytes, std::string(reinterpret_cast<const char*>(p), n)));
        return;
      }
      case EMPTY_TUPLE: Push(New(Kind::Tuple)); return;
      case TUPLE: Push(Tuple(PopMark("TUPLE"))); return;
      case TUPLE1:
      case TUPLE2:
      case TUPLE3: {
        const size_t n = op - TUPLE1 + 1;
        std::vector<Value*> items(n);
        for (size_t i = n; i-- > 0;) items[i] = Pop("TUPLE1/2/3");
        Push(Tuple(std::move(items)));
        return;
      }
      case EMPTY_LIST: Push(New(Kind::List)); return;
      case LIST: {
        Value* l = New(Kind::List);
        l->items = PopMark("LIST");
        Charge(l->items.size());
        Push(l);
        return;
      }
      case APPEND: {
        Value* v = Pop("APPEND");
        Append(Top("APPEND"), {v}, "APPEND");
        return;
      }
      case APPENDS: {
        std::vector<Value*> items = PopMark("APPENDS");
        Append(Top("APPENDS"), items, "APPENDS");
        return;
      }
      case EMPTY_DICT: Push(New(Kind::Dict)); return;
      case DICT: {
        std::vector<Value*> kv = PopMark("DICT");
        Value* d = New(Kind::Dict);
        SetItems(d, kv, "DICT");
        Push(d);
        return;
      }
      case SETITEM: {
        Value* v = Pop("SETITEM");
        Value* k = Pop("SETITEM");
        SetItems(Top("SETITEM"), {k, v}, "SETITEM");
        return;
      }
      case SETITEMS: {
        std::vector<Value*> kv = PopMark("SETITEMS");
        SetItems(Top("SETITEMS"), kv, "SETITEMS");
        return;
      }
      case EMPTY_SET: Push(New(Kind::List)); return;
      case ADDITEMS: {
        std::vector<Value*> items = PopMark("ADDITEMS");
        Append(Top("ADDITEMS"), items, "ADDITEMS");
        return;
      }
      case FROZENSET: {
        Value* l = New(Kind::List);
        l->items = PopMark("FROZENSET");
        Charge(l->items.size());
        Push(l);
        return;
      }
      case BINPUT: Memo(ReadLE(1, "BINPUT"), "BINPUT"); return;
      case LONG_BINPUT: Memo(ReadLE(4, "LONG_BINPUT"), "LONG_BINPUT"); return;
      case MEMOIZE: Memo(memo_.size(), "MEMOIZE"); return;
      case BINGET: Push(Recall(ReadLE(1, "BINGET"))); return;
      case LONG_BINGET: Push(Recall(ReadLE(4, "LONG_BINGET"))); return;
      case GLOBAL: {
        std::string module = Line("GLOBAL's module");
        std::string name = Line("GLOBAL's name");
        Push(Global(std::move(module), std::move(name)));
        return;
      }
      case STACK_GLOBAL: {
        Value* name = Pop("STACK_GLOBAL");
        Value* module = Pop("STACK_GLOBAL");
        if (module->kind != Kind::String || name->kind != Kind::String)
          Fail("STACK_GLOBAL's module and name are not strings");
        Push(Global(module->text, name->text));
        return;
      }
      case REDUCE: {
        Value* args = Pop("REDUCE");
        Value* callable = Pop("REDUCE");
        Push(Reduce(callable, args, "REDUCE"));
        return;
      }
      case NEWOBJ: {
        Value* args = Pop("NEWOBJ");
        Value* cls = Pop("NEWOBJ");
        Push(NewObject(cls, args, "NEWOBJ"));
        return;
      }
      case NEWOBJ_EX: {
        Value* kwargs = Pop("NEWOBJ_EX");
        Value* args = Pop("NEWOBJ_EX");
        Value* cls = Pop("NEWOBJ_EX");
        if (kwargs->kind != Kind::Dict) Fail("NEWOBJ_EX's keyword arguments are not a dict");
        Push(NewObject(cls, args, "NEWOBJ_EX"));
        return;
      }
      case INST: {
        std::string module = Line("INST's module");
        std::string name = Line("INST's name");
        Value* cls = Global(std::move(module), std::move(name));
        PopMark("INST");
        Push(NewText(Kind::Opaque, cls->text));
        return;
      }
      case OBJ: {
        std::vector<Value*> items = PopMark("OBJ");
        if (items.empty() || (items[0]->kind != Kind::Global && items[0]->kind != Kind::Opaque))
          Fail("OBJ does not start with a class");
        Push(NewText(Kind::Opaque, items[0]->text));
        return;
      }
      case BUILD: {
        Value* state = Pop("BUILD");
        (void)state;
        Value* target = Top("BUILD");
        // obj.__setstate__(state) / obj.__dict__.update(state): only Python attributes, which a tensor
        // state dict does not need (e.g. an OrderedDict's _metadata, a Parameter's attributes).
        switch (target->kind) {
          case Kind::Opaque:
          case Kind::Tensor:
          case Kind::Dict:
          case Kind::List: return;
          default: Fail(std::string("BUILD on a ") + KindName(target->kind) + ", which has no state to set");
        }
      }
      case BINPERSID: {
        Value* pid = Pop("BINPERSID");
        Push(PersistentLoad(pid));
        return;
      }
      case PERSID:
        Fail("text persistent ids (PERSID, protocol 0) are not used by torch.save and are not supported");
      case EXT1:
      case EXT2:
      case EXT4: Fail("the extension registry opcodes (EXT1/2/4) are not supported");
      case NEXT_BUFFER:
      case READONLY_BUFFER: Fail("out-of-band buffers (NEXT_BUFFER/READONLY_BUFFER) are not supported");
      case INT:
      case LONG:
      case FLOAT:
      case STRING:
      case UNICODE:
      case GET:
      case PUT: {
        char buf[8];
        std::snprintf(buf, sizeof buf, "'%c'", op);
        Fail(std::string("text opcode ") + buf + " of pickle protocol 0 is not supported (torch.save writes protocol 2)");
      }
      default: Fail("unknown opcode " + Hex(op));
    }
  }

  const uint8_t* data_;
  uint64_t size_;
  uint64_t pos_ = 0;
  uint64_t at_ = 0;  // offset of the opcode being run
  const std::string& file_;
  const UnpickleOptions& opt_;
  const Limits& L_;
  Document& doc_;
  std::vector<Value*> stack_;
  std::vector<size_t> marks_;
  std::unordered_map<uint64_t, Value*> memo_;
  std::unordered_map<std::string, Value*> storages_;
  size_t slots_ = 0;
};

// ---------------------------------------------------------------------------------------------
// Validation of the finished tree: no cycles, bounded depth, bounded size when shared subtrees are
// expanded (a memo "billion laughs" would otherwise explode in every consumer).

[[noreturn]] void TreeFail(const std::string& file, const std::string& what) {
  throw Error("PICKLE_FORMAT", "Invalid torch file " + file + ": " + what, {{"file", file}});
}

enum : uint8_t { kUnvisited = 0, kActive = 1, kDone = 2 };

void Visit(Value* v, size_t depth, const Limits& L, const std::string& file) {
  if (!v->isContainer()) return;
  if (depth + v->height > L.maxDepth || depth > L.maxDepth)
    TreeFail(file, "containers are nested more than " + std::to_string(L.maxDepth) + " levels deep");
  if (v->visit == kDone) return;
  if (v->visit == kActive) TreeFail(file, "a container contains itself (cyclic structure)");
  v->visit = kActive;
  uint64_t nodes = 1;
  uint32_t height = 0;
  auto child = [&](Value* c) {
    if (c->isContainer()) {
      Visit(c, depth + 1, L, file);
      height = std::max(height, c->height + 1);
      nodes += c->subtreeNodes;
    } else {
      height = std::max<uint32_t>(height, 1);
      nodes += 1;
    }
    if (nodes > L.maxTreeNodes)
      TreeFail(file, "the object expands to more than " + std::to_string(L.maxTreeNodes) +
                         " nodes when shared parts are counted each time they appear");
  };
  if (v->kind == Kind::Dict) {
    for (auto& [k, x] : v->dict) {
      child(k);
      child(x);
    }
  } else {
    for (Value* x : v->items) child(x);
  }
  v->visit = kDone;
  v->height = height;
  v->subtreeNodes = nodes;
  if (depth + height > L.maxDepth)
    TreeFail(file, "containers are nested more than " + std::to_string(L.maxDepth) + " levels deep");
}

void Finish(Document& doc, const Limits& L) {
  for (Value& v : doc.arena) {
    if (v.kind == Kind::Global) {
      v.kind = Kind::Opaque;  // a class or function that was named but never called
    } else if (v.kind == Kind::Storage) {
      // A storage saved on its own: show it as the 1-D tensor of its elements.
      v.tensor = at::empty({0}, at::TensorOptions().dtype(v.storageType)).set_(v.storage, 0, {v.storageNumel}, {1});
      v.kind = Kind::Tensor;
    }
  }
  Visit(doc.root, 0, L, doc.file);
}

c10::Storage AliasOrCopy(const zip::Archive& archive, const zip::Span& span, uint64_t nbytes, bool copy) {
  if (nbytes == 0) return at::empty({0}, at::kByte).storage();
  // torch.save aligns every storage to 64 bytes, so normally the bytes are used where they lie in the
  // (private, copy-on-write) map; misaligned data, and data to be byte-swapped, is copied once.
  if (!copy && archive.owner() && reinterpret_cast<uintptr_t>(span.data) % 16 == 0) {
    auto* keep = new std::shared_ptr<const void>(archive.owner());
    c10::DataPtr ptr(const_cast<uint8_t*>(span.data), keep,
                     [](void* ctx) { delete static_cast<std::shared_ptr<const void>*>(ctx); },
                     c10::Device(c10::kCPU));
    return c10::Storage(c10::Storage::use_byte_size_t(), static_cast<int64_t>(nbytes), std::move(ptr), nullptr,
                        false);
  }
  at::Tensor buf = at::empty({static_cast<int64_t>(nbytes)}, at::kByte);
  std::memcpy(buf.data_ptr<uint8_t>(), span.data, nbytes);
  return buf.storage();
}

}  // namespace

const char* KindName(Value::Kind k) {
  switch (k) {
    case Kind::None: return "None";
    case Kind::Bool: return "bool";
    case Kind::Int: return "int";
    case Kind::Float: return "float";
    case Kind::String: return "str";
    case Kind::Bytes: return "bytes";
    case Kind::Tensor: return "tensor";
    case Kind::List: return "list";
    case Kind::Tuple: return "tuple";
    case Kind::Dict: return "dict";
    case Kind::Opaque: return "opaque object";
    case Kind::Global: return "global";
    case Kind::Storage: return "storage";
  }
  return "value";
}

std::shared_ptr<Document> Unpickle(const uint8_t* data, uint64_t size, const std::string& file,
                                   const UnpickleOptions& options) {
  auto doc = std::make_shared<Document>();
  doc->file = file;
  Unpickler u(data, size, file, options, *doc);
  doc->root = u.Run();
  Finish(*doc, options.limits);
  return doc;
}

std::shared_ptr<Document> LoadTorchBytes(const uint8_t* data, uint64_t size, const std::string& file,
                                         const LoadOptions& options, std::shared_ptr<const void> owner) {
  auto fail = [&](const std::string& what) -> void {
    throw Error("PICKLE_FORMAT", "Cannot load " + file + ": " + what, {{"file", file}});
  };
  if (!zip::LooksLikeZip(data, size)) {
    static const uint8_t kLegacyMagic[] = {0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46,
                                           0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19};
    if (size >= sizeof kLegacyMagic && std::memcmp(data, kLegacyMagic, sizeof kLegacyMagic) == 0)
      fail("it is a legacy torch.save file (written by torch < 1.6 or with _use_new_zipfile_serialization=False), "
           "which is not supported. Re-save it with torch >= 1.6: torch.save(torch.load(f), f2), or convert it "
           "to safetensors");
    if (size >= 262 && std::memcmp(data + 257, "ustar", 5) == 0)
      fail("it is a tar-format torch file (torch < 0.4), which is not supported. Re-save it with torch >= 1.6 "
           "or convert it to safetensors");
    if (size >= 1 && data[0] == 0x80)
      fail("it is a bare pickle, not a torch.save ZIP archive. Re-save it with torch >= 1.6 or convert it to "
           "safetensors");
    fail("it is not a torch.save file (no ZIP signature at its start)");
  }
  zip::Archive archive = zip::Archive::Parse(data, size, file, std::move(owner));

  // torch names every entry "<archive>/...", the archive name being free ("archive" since torch 1.6
  // writes to files, the file's stem in some versions): find the one "<name>/data.pkl".
  std::string prefix;
  bool torchscript = false;
  for (const auto& e : archive.entries()) {
    const size_t slash = e.name.find('/');
    if (slash != std::string::npos && e.name.compare(slash, std::string::npos, "/data.pkl") == 0) {
      if (!prefix.empty()) archive.Fail("it holds more than one data.pkl");
      prefix = e.name.substr(0, slash + 1);
    }
    if (e.name.size() >= 13 && e.name.compare(e.name.size() - 13, 13, "constants.pkl") == 0) torchscript = true;
  }
  if (prefix.empty()) {
    if (torchscript)
      archive.Fail("it is a TorchScript archive (torch.jit.save), not a torch.save file; load it in Python and "
                   "save its state_dict with torch.save or safetensors");
    archive.Fail("it is a ZIP archive without a <name>/data.pkl entry, so it is not a torch.save file");
  }

  bool bigEndian = false;
  if (const zip::Entry* bo = archive.Find(prefix + "byteorder")) {
    zip::Span s = archive.ReadVerified(*bo);
    const std::string order(reinterpret_cast<const char*>(s.data), s.size);
    if (order == "big") bigEndian = true;
    else if (order != "little") archive.Fail("its byteorder entry says \"" + order.substr(0, 32) + "\"");
  }

  const zip::Entry* pkl = archive.Find(prefix + "data.pkl");
  if (pkl->uncompressedSize > options.limits.maxPickle)
    archive.Fail("its data.pkl is " + std::to_string(pkl->uncompressedSize) + " bytes, more than the limit of " +
                 std::to_string(options.limits.maxPickle));
  zip::Span pickle = archive.ReadVerified(*pkl);

  UnpickleOptions uo;
  uo.limits = options.limits;
  uo.storages = [&archive, &prefix, bigEndian](const std::string& key, uint64_t nbytes) -> c10::Storage {
    const std::string name = prefix + "data/" + key;
    const zip::Entry* e = archive.Find(name);
    if (!e) archive.Fail("the pickle refers to storage \"" + key + "\" but the archive has no entry " + name);
    zip::Span s = archive.Read(*e);
    if (s.size < nbytes)
      archive.Fail("storage \"" + key + "\" needs " + std::to_string(nbytes) + " bytes but its entry holds " +
                   std::to_string(s.size));
    return AliasOrCopy(archive, s, nbytes, /*copy=*/bigEndian);
  };
  std::shared_ptr<Document> doc = Unpickle(pickle.data, pickle.size, file, uo);

  if (bigEndian) {
    // Saved on a big-endian machine (s390x, ...): each storage holds one dtype (torch refuses to save
    // views of one storage as different dtypes), so swap every private copy in place once.
    std::unordered_set<const void*> done;
    for (Value& v : doc->arena) {
      if (v.kind != Kind::Tensor || !v.tensor.has_storage()) continue;
      const size_t elem = v.tensor.element_size();
      const c10::Storage& st = v.tensor.storage();
      if (elem == 1 || st.nbytes() == 0 || !done.insert(st.data()).second) continue;
      uint8_t* p = static_cast<uint8_t*>(st.mutable_data());
      for (uint64_t i = 0; i + elem <= st.nbytes(); i += elem) std::reverse(p + i, p + i + elem);
    }
  }

  // Conversions apply once per distinct tensor node, so a tensor shared by several keys stays shared.
  if (options.dtype || !options.device.is_cpu()) {
    for (Value& v : doc->arena) {
      if (v.kind != Kind::Tensor) continue;
      if (options.dtype && at::isFloatingType(v.tensor.scalar_type()) && v.tensor.scalar_type() != *options.dtype)
        v.tensor = v.tensor.to(*options.dtype);
      if (!options.device.is_cpu()) v.tensor = v.tensor.to(options.device);
    }
  }
  return doc;
}

std::shared_ptr<Document> LoadTorchFile(const std::string& path, const LoadOptions& options) {
  auto map = safetensors::MappedFile::Open(path);
  return LoadTorchBytes(map->data(), map->size(), path, options, map);
}

std::string KeyText(const Value& key) {
  constexpr size_t kMax = 1024;
  std::string out;
  std::function<void(const Value&, int)> put = [&](const Value& k, int depth) {
    if (out.size() > kMax) return;
    switch (k.kind) {
      case Kind::String: out += k.text; return;
      case Kind::Int: out += std::to_string(k.integer); return;
      case Kind::Bool: out += k.boolean ? "True" : "False"; return;
      case Kind::None: out += "None"; return;
      case Kind::Float: {
        char buf[32];
        std::snprintf(buf, sizeof buf, "%.17g", k.number);
        out += buf;
        return;
      }
      case Kind::Opaque:
      case Kind::Global: out += k.text; return;
      case Kind::Bytes: out += "<bytes>"; return;
      case Kind::Tensor:
      case Kind::Storage: out += "<tensor>"; return;
      case Kind::Tuple:
        if (depth > 8) {
          out += "(...)";
          return;
        }
        out += "(";
        for (size_t i = 0; i < k.items.size() && out.size() <= kMax; ++i) {
          if (i) out += ", ";
          put(*k.items[i], depth + 1);
        }
        out += k.items.size() == 1 ? ",)" : ")";
        return;
      default: out += std::string("<") + KindName(k.kind) + ">"; return;
    }
  };
  put(key, 0);
  if (out.size() > kMax) out = out.substr(0, kMax) + "...";
  return out;
}

std::vector<std::pair<std::string, at::Tensor>> FlattenTensors(const Document& doc) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  std::unordered_map<std::string, const Value*> seen;
  std::function<void(const Value&, const std::string&)> walk = [&](const Value& v, const std::string& prefix) {
    if (v.kind == Kind::Tensor) {
      auto [it, inserted] = seen.emplace(prefix, &v);
      if (!inserted) {
        if (it->second == &v) return;
        throw Error("PICKLE_FORMAT",
                    "Cannot flatten " + doc.file + ": two different tensors are both named \"" + prefix + "\"",
                    {{"file", doc.file}});
      }
      out.emplace_back(prefix, v.tensor);
      return;
    }
    if (v.kind != Kind::Dict) return;
    for (const auto& [k, x] : v.dict) {
      const std::string key = KeyText(*k);
      walk(*x, prefix.empty() ? key : prefix + "." + key);
    }
  };
  if (doc.root) walk(*doc.root, "");
  return out;
}

}  // namespace cd::pickle
