#!/usr/bin/env node
'use strict';
// `npm install` step: use a prebuilt binary made for the LibTorch at hand, else build from source
// with node-gyp. Without LibTorch it stops with instructions instead of a linker error.
const path = require('path');
const { spawnSync } = require('child_process');
const { findLibTorch } = require('./find-libtorch');
const addon = require('./addon');
const nodeGyp = require('./node-gyp');

function loads(file) {
  const r = spawnSync(process.execPath, ['-e', `require(${JSON.stringify(file)})`], { encoding: 'utf8' });
  return r.status === 0 ? null : (r.stderr || '').trim().split('\n').slice(-3).join(' ');
}

function main() {
  let libtorch;
  try {
    libtorch = findLibTorch();
  } catch (e) {
    process.stderr.write(`\ncustom-diffusion: ${e.message}\n\n`);
    return 1;
  }
  process.stderr.write(
    `custom-diffusion: LibTorch ${libtorch.version} (${libtorch.cuda ? 'CUDA' : 'CPU'}) from ${libtorch.source}: ${libtorch.root}\n`,
  );
  if (process.env.CUSTOM_DIFFUSION_BUILD_FROM_SOURCE !== '1') {
    const { file, rejected } = addon.select(libtorch);
    for (const r of rejected) process.stderr.write(`custom-diffusion: not using ${r}\n`);
    if (file) {
      const why = loads(file);
      if (!why) {
        process.stderr.write(`custom-diffusion: using ${path.relative(addon.ROOT, file)}\n`);
        return 0;
      }
      process.stderr.write(`custom-diffusion: ${file} does not load here (${why}); building from source\n`);
    }
  }
  process.stderr.write('custom-diffusion: building the native addon from source (a few minutes)...\n');
  const status = nodeGyp.run(['rebuild', '--release', `--jobs=${process.env.JOBS || 'max'}`], { cwd: addon.ROOT });
  if (status !== 0) {
    process.stderr.write('\ncustom-diffusion: the source build failed (see above). A C++20 compiler, make and Python 3 are needed.\n');
    return status;
  }
  addon.writeSidecar(path.join(addon.ROOT, 'build', 'Release', `${addon.ADDON_NAME}.node`), libtorch);
  return 0;
}

process.exit(main());
