#!/usr/bin/env node
'use strict';
// `npm run prebuild`: makes the prebuilt binary for the LibTorch at hand with prebuildify and
// names it by flavour (prebuilds/<platform>-<arch>/node.napi.<cpu|cuda>.node), with the LibTorch
// identity recorded beside it. Run it once with a CPU and once with a CUDA LibTorch to ship both.
const fs = require('fs');
const os = require('os');
const path = require('path');
const { spawnSync } = require('child_process');
const { findLibTorch } = require('./find-libtorch');
const addon = require('./addon');

const libtorch = findLibTorch();
const flavour = libtorch.cuda ? 'cuda' : 'cpu';
const dir = path.join(addon.ROOT, 'prebuilds', `${process.platform}-${process.arch}`);
// Outside build/: node-gyp rebuild starts by deleting build/.
const staging = fs.mkdtempSync(path.join(os.tmpdir(), 'cd-prebuild-'));

const r = spawnSync(
  process.execPath,
  [
    require.resolve('prebuildify/bin.js'),
    '--napi',
    '--strip',
    `--target=${process.versions.node}`,
    `--node-gyp=${path.join(__dirname, 'node-gyp.js')}`,
    `--out=${staging}`,
  ],
  { cwd: addon.ROOT, stdio: 'inherit', env: { ...process.env } },
);
if (r.status !== 0) process.exit(r.status || 1);

const built = path.join(staging, 'prebuilds', `${process.platform}-${process.arch}`, 'custom-diffusion.node');
if (!fs.existsSync(built)) {
  process.stderr.write(`prebuildify did not produce ${built}\n`);
  process.exit(1);
}
fs.mkdirSync(dir, { recursive: true });
const dest = path.join(dir, `node.napi.${flavour}.node`);
fs.copyFileSync(built, dest);
addon.writeSidecar(dest, libtorch);
fs.rmSync(staging, { recursive: true, force: true });
process.stderr.write(`prebuild: ${path.relative(addon.ROOT, dest)} for ${libtorch.identity}\n`);
