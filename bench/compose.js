#!/usr/bin/env node
'use strict';
// Time of the closed-form multi-concept merge (native composeLayers) for two SD1.5-sized concepts on
// this machine: the real 32 K/V shapes ([320|640|1280] × 768, 16 attn2 blocks), ~10 target rows per
// concept and ~10k regularisation rows (what 1000 captions of ~10 tokens give). The text encoder is
// NOT run: the regularisation and target embeddings are random (N(0,1)) rows of the right shapes,
// which leaves the timed linear algebra unchanged (real embeddings only change the conditioning).
//
//   npm run build:ts && node bench/compose.js [--reg-rows 10000] [--target-rows 10] [--width 768]
//                                              [--rounds 3] [--threads N]
// CUSTOM_DIFFUSION_LIB points at another compiled library folder (default lib/).
const path = require('path');

const root = path.resolve(__dirname, '..');
const lib = process.env.CUSTOM_DIFFUSION_LIB || path.join(root, 'lib');

function args() {
  const a = { regRows: 10000, targetRows: 10, width: 768, rounds: 3, threads: 0 };
  const argv = process.argv.slice(2);
  for (let i = 0; i < argv.length; i += 2) {
    const k = argv[i].replace(/^--/, '').replace(/-(\w)/g, (_, c) => c.toUpperCase());
    if (!(k in a)) throw new Error(`unknown option ${argv[i]}`);
    a[k] = Number(argv[i + 1]);
  }
  return a;
}

async function main() {
  const a = args();
  const { Tensor, setNumThreads, getNumThreads } = require(lib);
  const { composeLayers } = require(path.join(lib, 'delta'));
  if (a.threads > 0) setNumThreads(a.threads);
  const channels = [320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320];
  const names = [];
  const base = {};
  channels.forEach((c, i) => {
    for (const kv of ['k', 'v']) {
      const n = `block${i}.attn2.to_${kv}.weight`;
      names.push(n);
      base[n] = Tensor.randn([c, a.width]);
    }
  });
  const concepts = [0, 1].map(() => ({
    keys: Tensor.randn([a.targetRows, a.width]),
    weights: Object.fromEntries(names.map((n) => [n, Tensor.randn(base[n].shape)])),
  }));
  const reg = Tensor.randn([a.regRows, a.width]);
  const times = [];
  let last;
  for (let r = 0; r < a.rounds; r++) {
    const t0 = process.hrtime.bigint();
    last = await composeLayers(base, concepts, reg);
    times.push(Number(process.hrtime.bigint() - t0) / 1e9);
    for (const t of Object.values(last.weights)) t.dispose();
  }
  const worst = Math.max(...last.layers.map((l) => l.relConstraintResidual));
  console.log(
    JSON.stringify({
      layers: names.length,
      width: a.width,
      regRows: a.regRows,
      targetRows: last.targetRows,
      threads: getNumThreads(),
      seconds: times.map((t) => Number(t.toFixed(3))),
      bestSeconds: Number(Math.min(...times).toFixed(3)),
      maxRelConstraintResidual: worst,
      solver: last.solver,
      note: 'random embeddings stand in for the text encoder (not timed); the paper reports ~2 s on a GPU',
    }),
  );
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
