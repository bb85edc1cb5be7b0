'use strict';
// Where the compiled addon lives and whether it fits the LibTorch at hand. Shared by the install
// script (plain Node, before any TypeScript is built) and the runtime loader (src/native.ts).
//
// Each addon file has a sidecar `<name>.libtorch.json` that records the LibTorch it was compiled
// against. node-gyp-build would pick a prebuild by platform, arch and Node-API tags alone (it ignores
// tags it does not know), and an addon loaded against another LibTorch crashes or misbehaves, so we
// filter candidates by that identity first.

const fs = require('fs');
const path = require('path');
const nodeGypBuild = require('node-gyp-build');

const ROOT = path.resolve(__dirname, '..');
const ADDON_NAME = 'custom_diffusion';

function sidecarOf(file) {
  return file.replace(/\.node$/, '.libtorch.json');
}

function readSidecar(file) {
  try {
    return JSON.parse(fs.readFileSync(sidecarOf(file), 'utf8'));
  } catch {
    return null;
  }
}

function writeSidecar(file, libtorch) {
  const data = { identity: libtorch.identity, version: libtorch.version, cuda: libtorch.cuda, root: libtorch.root };
  fs.writeFileSync(sidecarOf(file), JSON.stringify(data, null, 2) + '\n');
}

/** Prebuilt binaries for this platform and arch whose Node-API tag fits this Node. */
function prebuildCandidates(root = ROOT) {
  const dir = path.join(root, 'prebuilds', `${process.platform}-${process.arch}`);
  let files = [];
  try {
    files = fs.readdirSync(dir).filter((f) => f.endsWith('.node'));
  } catch {
    return [];
  }
  return files
    .map((f) => ({ tags: nodeGypBuild.parseTags(f), file: path.join(dir, f) }))
    .filter((c) => c.tags && c.tags.napi)
    .map((c) => c.file);
}

/**
 * Candidate addon files in order of preference: an explicit CUSTOM_DIFFUSION_ADDON, a local
 * source build, then prebuilds. Each comes with the identity recorded beside it.
 */
function candidates(root = ROOT, env = process.env) {
  const list = [];
  if (env.CUSTOM_DIFFUSION_ADDON) list.push({ file: path.resolve(env.CUSTOM_DIFFUSION_ADDON), kind: 'env' });
  for (const cfg of ['Release', 'Debug']) {
    const f = path.join(root, 'build', cfg, `${ADDON_NAME}.node`);
    if (fs.existsSync(f)) list.push({ file: f, kind: 'build' });
  }
  for (const f of prebuildCandidates(root)) list.push({ file: f, kind: 'prebuild' });
  return list.map((c) => ({ ...c, sidecar: readSidecar(c.file) }));
}

/**
 * Picks the addon for `libtorch` (from find-libtorch.js). Returns {file, rejected} where rejected
 * lists candidates refused, with the reason, for error messages.
 */
function select(libtorch, root = ROOT, env = process.env) {
  const rejected = [];
  for (const c of candidates(root, env)) {
    if (c.kind === 'env') return { file: c.file, rejected };
    if (!c.sidecar) {
      rejected.push(`${c.file}: no record of the LibTorch it was built for`);
      continue;
    }
    if (c.sidecar.identity !== libtorch.identity) {
      rejected.push(`${c.file}: built for ${c.sidecar.identity}, but the LibTorch here is ${libtorch.identity}`);
      continue;
    }
    return { file: c.file, rejected };
  }
  return { file: null, rejected };
}

module.exports = { ROOT, ADDON_NAME, candidates, select, sidecarOf, readSidecar, writeSidecar, prebuildCandidates };

// `node scripts/addon.js --write-sidecar FILE` (run by CMakeLists.txt after linking).
if (require.main === module && process.argv[2] === '--write-sidecar') {
  writeSidecar(path.resolve(process.argv[3]), require('./find-libtorch').findLibTorch());
}
