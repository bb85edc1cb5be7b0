#!/usr/bin/env node
/**
 * Pretrains the embedded toy model from scratch (see src/pretrain/toy.ts) and writes it as a
 * diffusers folder. `npm run pretrain:toy` builds the TypeScript first.
 *
 *   node scripts/pretrain-toy.js [--out DIR] [--seed N] [--threads N] [--smoke]
 *        [--vae-steps N] [--vae-batch N] [--vae-lr X] [--kl-weight X]
 *        [--unet-steps N] [--unet-batch N] [--unet-lr X] [--ema X] [--cache-images N]
 *        [--eval N | --no-eval] [--eval-steps N] [--guidance X] [--dtype float16|float32] [--log-every N]
 *
 * Defaults are the full recipe: 4,000 VAE steps and 15,000 UNet steps at batch 32 (306 and 148 ms
 * per step on 2 idle CPU cores: the committed model took 58 minutes; each phase prints ms/step); --smoke is a 1-2 minute run with
 * tiny step counts, for checking the pipeline end to end. The same seed, options and thread count
 * give the same folder. Progress goes to stdout; Ctrl-C stops cleanly (nothing is written).
 */
'use strict';

const path = require('path');

const root = path.resolve(__dirname, '..');
const DEFAULT_OUT = path.join(root, 'models', 'toy');

const SMOKE = {
  vaeSteps: 60,
  vaeBatch: 16,
  unetSteps: 150,
  unetBatch: 16,
  cacheImages: 1024,
  scaleImages: 256,
  evalImages: 12,
  logEvery: 10,
};

function usage(message) {
  if (message) console.error(`pretrain-toy: ${message}`);
  console.error('usage: node scripts/pretrain-toy.js [--out DIR] [--seed N] [--threads N] [--smoke] [--vae-steps N] ' +
    '[--vae-batch N] [--vae-lr X] [--kl-weight X] [--unet-steps N] [--unet-batch N] [--unet-lr X] [--ema X] ' +
    '[--cache-images N] [--eval N | --no-eval] [--eval-steps N] [--guidance X] [--dtype float16|float32] [--log-every N]');
  process.exit(2);
}

function parseArgs(argv) {
  const a = {};
  const numeric = {
    '--seed': 'seed', '--threads': 'threads', '--vae-steps': 'vaeSteps', '--vae-batch': 'vaeBatch', '--vae-lr': 'vaeLr',
    '--kl-weight': 'klWeight', '--unet-steps': 'unetSteps', '--unet-batch': 'unetBatch', '--unet-lr': 'unetLr',
    '--ema': 'ema', '--cache-images': 'cacheImages', '--eval': 'evalImages', '--eval-steps': 'evalSteps',
    '--guidance': 'guidance', '--log-every': 'logEvery', '--scale-images': 'scaleImages',
  };
  for (let i = 0; i < argv.length; i++) {
    const k = argv[i];
    if (k === '--smoke') a.smoke = true;
    else if (k === '--no-eval') a.noEval = true;
    else if (k === '--out') a.out = argv[++i] ?? usage('--out needs a folder');
    else if (k === '--dtype') a.dtype = argv[++i] ?? usage('--dtype needs a value');
    else if (k === '-h' || k === '--help') usage();
    else if (numeric[k]) {
      const v = Number(argv[++i]);
      if (!Number.isFinite(v)) usage(`${k} needs a number`);
      a[numeric[k]] = v;
    } else usage(`unknown option ${k}`);
  }
  return a;
}

function fmt(x, digits = 4) {
  return typeof x === 'number' ? x.toFixed(digits) : String(x);
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const base = args.smoke ? SMOKE : {};
  const pick = (k) => (args[k] !== undefined ? args[k] : base[k]);
  const { pretrainToy } = require(path.join(root, 'lib', 'pretrain'));
  const controller = new AbortController();
  process.once('SIGINT', () => {
    console.log('\nStopping (nothing is written)...');
    controller.abort();
  });
  const evalImages = args.noEval ? 0 : pick('evalImages') ?? 60;
  const started = Date.now();
  const clock = () => {
    const s = Math.round((Date.now() - started) / 1000);
    return `${String(Math.floor(s / 60)).padStart(3)}:${String(s % 60).padStart(2, '0')}`;
  };
  const result = await pretrainToy({
    outDir: path.resolve(args.out ?? DEFAULT_OUT),
    seed: args.seed ?? 0,
    threads: args.threads ?? 2,
    dtype: args.dtype ?? 'float16',
    cacheImages: pick('cacheImages'),
    scaleImages: pick('scaleImages'),
    logEvery: pick('logEvery') ?? 100,
    vae: { steps: pick('vaeSteps'), batchSize: pick('vaeBatch'), learningRate: args.vaeLr, klWeight: args.klWeight },
    unet: { steps: pick('unetSteps'), batchSize: pick('unetBatch'), learningRate: args.unetLr, emaDecay: args.ema },
    evaluate: evalImages > 0 ? { images: evalImages, steps: args.evalSteps, guidanceScale: args.guidance } : false,
    signal: controller.signal,
    onEvent: (e) => {
      switch (e.phase) {
        case 'init':
          console.log(`${clock()} init: parameters vae ${e.parameters.vae}, unet ${e.parameters.unet}, text encoder ${e.parameters.textEncoder}; ${e.threads} threads`);
          break;
        case 'vae':
          console.log(`${clock()} vae  ${String(e.step).padStart(6)}/${e.steps} loss ${fmt(e.loss)} (L1 ${fmt(e.recon)}, KL ${fmt(e.kl, 1)}) lr ${e.lr.toExponential(2)} |g| ${fmt(e.gradNorm, 3)} ${e.msPerStep.toFixed(0)} ms/step`);
          break;
        case 'scale':
          console.log(`${clock()} latent scaling factor ${e.scalingFactor}`);
          break;
        case 'cache':
          console.log(`${clock()} cached ${e.images} posteriors in ${(e.ms / 1000).toFixed(1)} s`);
          break;
        case 'unet':
          console.log(`${clock()} unet ${String(e.step).padStart(6)}/${e.steps} loss ${fmt(e.loss)} lr ${e.lr.toExponential(2)} |g| ${fmt(e.gradNorm, 3)} ${e.msPerStep.toFixed(0)} ms/step`);
          break;
        case 'write':
          console.log(`${clock()} wrote ${e.dir} (${(e.bytes / 1e6).toFixed(2)} MB)`);
          break;
        case 'eval': {
          const a = e.accuracy;
          console.log(`${clock()} judge ${e.group.padEnd(8)} colour+background+shape ${(100 * e.target).toFixed(1)}% ` +
            `(colour ${(100 * a.colour).toFixed(0)}%, background ${(100 * a.background).toFixed(0)}%, shape ${(100 * a.shape).toFixed(0)}%, size ${(100 * a.size).toFixed(0)}%; n=${a.n})`);
          break;
        }
      }
    },
  });
  console.log(`${clock()} done: vae ${result.vae.msPerStep.toFixed(0)} ms/step (native ${result.vae.nativeMsPerStep.toFixed(0)}), ` +
    `unet ${result.unet.msPerStep.toFixed(0)} ms/step (native ${result.unet.nativeMsPerStep.toFixed(0)}), ` +
    `loss vae ${fmt(result.vae.firstLoss)} → ${fmt(result.vae.lastLoss)}, unet ${fmt(result.unet.firstLoss)} → ${fmt(result.unet.lastLoss)}`);
}

main().catch((e) => {
  if (e && e.name === 'AbortError') process.exit(130);
  console.error(e && e.stack ? e.stack : e);
  process.exit(1);
});
