#!/usr/bin/env node
'use strict';
// The one place that finds LibTorch and computes how to compile and link against it.
// CMakeLists.txt, binding.gyp, the install script and the runtime loader all ask this file,
// so the two build descriptions cannot drift apart.
//
// Search order: $LIBTORCH (a LibTorch folder, as tch-rs uses it), then the `torch` package of
// $PYTHON or python3 (its include/ and lib/ are a complete LibTorch), else a clear error.
//
// We never use TorchConfig.cmake: a CUDA wheel's config insists on a CUDA toolkit, which users who
// only run (or build on a machine without nvcc) do not have. Everything it would give us is
// computed here from the folder itself.

const fs = require('fs');
const path = require('path');
const { execFileSync } = require('child_process');

class LibTorchNotFoundError extends Error {
  constructor(message) {
    super(message);
    this.name = 'LibTorchNotFoundError';
    this.code = 'LIBTORCH_NOT_FOUND';
  }
}

const HOW_TO_GET = [
  'custom-diffusion needs LibTorch (the C++ library of PyTorch) to build and run. Either:',
  '  - install the torch Python package:  python3 -m pip install torch',
  '    (its include/ and lib/ folders are a complete LibTorch; set PYTHON to pick another interpreter), or',
  '  - download a LibTorch zip for your platform and set LIBTORCH=/path/to/libtorch.',
  'Then run `npm rebuild custom-diffusion` (or `npm run build:native` in a checkout).',
].join('\n');

function isLibTorchDir(dir) {
  return (
    fs.existsSync(path.join(dir, 'include', 'torch', 'csrc', 'api', 'include', 'torch', 'version.h')) &&
    fs.existsSync(path.join(dir, 'lib')) &&
    libFile(dir, 'torch') !== null
  );
}

function libFile(dir, name) {
  const candidates = [`lib${name}.so`, `lib${name}.dylib`, `${name}.lib`];
  for (const c of candidates) {
    const p = path.join(dir, 'lib', c);
    if (fs.existsSync(p)) return p;
  }
  return null;
}

/** Finds the torch package folder of a Python interpreter without importing torch (fast). */
function torchDirFromPython(python) {
  try {
    const out = execFileSync(
      python,
      [
        '-c',
        'import importlib.util as u; s = u.find_spec("torch"); print(s.submodule_search_locations[0] if s else "")',
      ],
      { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'], timeout: 20000 },
    ).trim();
    return out || null;
  } catch {
    return null;
  }
}

function readVersion(dir) {
  // LibTorch zips carry build-version ("2.5.1+cpu"); the Python package carries version.py
  // ("2.15.0+cu132"). Both name the CUDA flavour, which the headers alone do not.
  const buildVersion = path.join(dir, 'build-version');
  if (fs.existsSync(buildVersion)) return fs.readFileSync(buildVersion, 'utf8').trim();
  const versionPy = path.join(dir, 'version.py');
  if (fs.existsSync(versionPy)) {
    const m = fs.readFileSync(versionPy, 'utf8').match(/__version__\s*=\s*'([^']+)'/);
    if (m) return m[1];
  }
  for (const rel of ['torch/headeronly/version.h', 'torch/csrc/api/include/torch/version.h']) {
    const file = path.join(dir, 'include', rel);
    if (!fs.existsSync(file)) continue;
    const header = fs.readFileSync(file, 'utf8');
    const part = (n) => (header.match(new RegExp(`#define\\s+TORCH_VERSION_${n}\\s+(\\d+)`)) || [])[1];
    if (part('MAJOR')) return [part('MAJOR'), part('MINOR'), part('PATCH')].join('.');
  }
  return 'unknown';
}

/**
 * The libstdc++ ABI that LibTorch was compiled with. An addon built with the other ABI links but
 * fails at load with missing std::string symbols, so it must match.
 */
function readCxx11Abi(dir) {
  const cfg = path.join(dir, 'share', 'cmake', 'Torch', 'TorchConfig.cmake');
  if (fs.existsSync(cfg)) {
    const m = fs.readFileSync(cfg, 'utf8').match(/_GLIBCXX_USE_CXX11_ABI=(\d)/);
    if (m) return Number(m[1]);
  }
  // Fall back to the symbol names the library exports: the new ABI mangles std::string as
  // std::__cxx11::basic_string, which appears in c10's exported symbols.
  const c10 = libFile(dir, 'c10');
  if (c10) {
    try {
      const buf = fs.readFileSync(c10);
      return buf.includes('St7__cxx11') || buf.includes('NSt7__cxx1112basic_string') ? 1 : 0;
    } catch {
      /* fall through */
    }
  }
  return 1;
}

/**
 * Locates LibTorch and describes it.
 * @returns {{root: string, source: string, version: string, cuda: boolean, cxx11Abi: number,
 *   includeDirs: string[], libDir: string, libs: string[], defines: string[], identity: string}}
 */
function findLibTorch(env = process.env) {
  const tried = [];
  let root = null;
  let source = null;
  if (env.LIBTORCH) {
    const dir = path.resolve(env.LIBTORCH);
    if (!isLibTorchDir(dir)) {
      throw new LibTorchNotFoundError(
        `LIBTORCH is set to ${dir}, but that folder is not a LibTorch (expected include/torch/csrc/api/include/torch/version.h and lib/libtorch.*).\n${HOW_TO_GET}`,
      );
    }
    root = dir;
    source = 'LIBTORCH';
  } else {
    const pythons = env.PYTHON ? [env.PYTHON] : ['python3', 'python'];
    for (const py of pythons) {
      const dir = torchDirFromPython(py);
      tried.push(`${py}: ${dir ? dir : 'no torch package'}`);
      if (dir && isLibTorchDir(dir)) {
        root = dir;
        source = `torch package of ${py}`;
        break;
      }
    }
  }
  if (!root) {
    throw new LibTorchNotFoundError(
      `LibTorch was not found (LIBTORCH is not set; ${tried.join('; ')}).\n${HOW_TO_GET}`,
    );
  }
  const version = readVersion(root);
  const cuda = libFile(root, 'torch_cuda') !== null;
  const cxx11Abi = readCxx11Abi(root);
  const libDir = path.join(root, 'lib');
  const libs = ['torch', 'torch_cpu', 'c10'];
  if (cuda) libs.push('torch_cuda', 'c10_cuda');
  const defines = [`_GLIBCXX_USE_CXX11_ABI=${cxx11Abi}`];
  if (cuda) defines.push('CD_LIBTORCH_CUDA=1');
  return {
    root,
    source,
    version,
    cuda,
    cxx11Abi,
    includeDirs: [path.join(root, 'include'), path.join(root, 'include', 'torch', 'csrc', 'api', 'include')],
    libDir,
    libs,
    defines,
    identity: identityOf({ version, cuda, cxx11Abi }),
  };
}

/** A short string that names a LibTorch build well enough to tell whether a prebuild fits it. */
function identityOf({ version, cuda, cxx11Abi }) {
  return `libtorch-${version}-${cuda ? 'cuda' : 'cpu'}-abi${cxx11Abi}`;
}

/**
 * Linker flags. With a CUDA LibTorch the addon references nothing in libtorch_cuda directly (CUDA
 * kernels register themselves when the library loads), so an --as-needed linker would drop it and
 * CUDA would silently be unavailable at run time. --no-as-needed keeps it.
 */
function linkFlags(info) {
  const flags = [`-L${info.libDir}`, `-Wl,-rpath,${info.libDir}`, '-Wl,--no-as-needed'];
  for (const l of info.libs) flags.push(`-l${l}`);
  flags.push('-Wl,--as-needed');
  return flags;
}

function announce(info) {
  process.stderr.write(
    `custom-diffusion: using LibTorch ${info.version} (${info.cuda ? 'CUDA' : 'CPU'}, C++11 ABI ${info.cxx11Abi}) from ${info.source}: ${info.root}\n`,
  );
}

function main(argv) {
  const what = argv[2] || '--json';
  let info;
  try {
    info = findLibTorch();
  } catch (e) {
    process.stderr.write(`\n${e.message}\n\n`);
    process.exit(1);
  }
  switch (what) {
    case '--json':
      process.stdout.write(JSON.stringify({ ...info, linkFlags: linkFlags(info) }, null, 2) + '\n');
      break;
    case '--include':
      announce(info);
      process.stdout.write(info.includeDirs.join(' ') + '\n');
      break;
    case '--identity':
      process.stdout.write(info.identity + '\n');
      break;
    case '--defines':
      process.stdout.write(info.defines.join(' ') + '\n');
      break;
    case '--ldflags':
      process.stdout.write(linkFlags(info).join(' ') + '\n');
      break;
    case '--cmake':
      // One `set()` per line, read by CMakeLists.txt with include().
      process.stdout.write(
        [
          `set(LIBTORCH_ROOT "${info.root}")`,
          `set(LIBTORCH_VERSION "${info.version}")`,
          `set(LIBTORCH_SOURCE "${info.source}")`,
          `set(LIBTORCH_IDENTITY "${info.identity}")`,
          `set(LIBTORCH_INCLUDE_DIRS "${info.includeDirs.join(';')}")`,
          `set(LIBTORCH_DEFINES "${info.defines.join(';')}")`,
          `set(LIBTORCH_LINK_FLAGS "${linkFlags(info).join(';')}")`,
          '',
        ].join('\n'),
      );
      break;
    case '--announce':
      announce(info);
      break;
    default:
      process.stderr.write(`unknown option ${what}\n`);
      process.exit(2);
  }
}

module.exports = { findLibTorch, identityOf, linkFlags, LibTorchNotFoundError, HOW_TO_GET };

if (require.main === module) main(process.argv);
