#!/usr/bin/env node
'use strict';
// Runs node-gyp with the headers of the Node.js that runs this script when they are installed
// locally (Debian, NodeSource and official tarballs ship include/node), so source builds work
// offline. Used by the install script and by prebuildify (--node-gyp).
const fs = require('fs');
const path = require('path');
const { spawnSync } = require('child_process');

function nodeGypBin() {
  try {
    return require.resolve('node-gyp/bin/node-gyp.js');
  } catch {
    // npm ships its own node-gyp and tells install scripts where it is.
    if (process.env.npm_config_node_gyp) return process.env.npm_config_node_gyp;
    const bundled = path.join(path.dirname(process.execPath), '..', 'lib', 'node_modules', 'npm', 'node_modules', 'node-gyp', 'bin', 'node-gyp.js');
    if (fs.existsSync(bundled)) return bundled;
    throw new Error('node-gyp was not found: install it with `npm install -g node-gyp`.');
  }
}

function localNodeDir() {
  const prefix = path.resolve(path.dirname(process.execPath), '..');
  return fs.existsSync(path.join(prefix, 'include', 'node', 'common.gypi')) ? prefix : null;
}

function run(args, options = {}) {
  // node-gyp puts the Python it picked for gyp first on PATH, so inside binding.gyp `python3` may be
  // another interpreter than the user's (one without torch). Resolve LibTorch here, once, and pass it on.
  const env = { ...process.env, ...(options.env || {}) };
  if (!env.LIBTORCH) {
    try {
      env.LIBTORCH = require('./find-libtorch').findLibTorch(env).root;
    } catch (e) {
      process.stderr.write(`\n${e.message}\n\n`);
      return 1;
    }
  }
  const extra = [];
  const nodedir = localNodeDir();
  if (nodedir && !args.some((a) => a.startsWith('--nodedir'))) extra.push(`--nodedir=${nodedir}`);
  // prebuildify asks for a specific --target; with local headers the running Node is the target.
  const filtered = nodedir ? args.filter((a) => !a.startsWith('--target=') && !a.startsWith('--devdir=')) : args;
  const r = spawnSync(process.execPath, [nodeGypBin(), ...filtered, ...extra], { stdio: 'inherit', ...options, env });
  return r.status === null ? 1 : r.status;
}

module.exports = { run, localNodeDir };
if (require.main === module) process.exit(run(process.argv.slice(2)));
