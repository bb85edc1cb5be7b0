#!/usr/bin/env node
'use strict';
// Resident memory of a long training run: train() for N optimizer steps (default 500) on the tiny
// SD1 fixture with prior preservation and augmentation, sampling the process RSS and the addon's live
// tensor count every step. Memory must not grow: after warm-up, the end equals the start up to
// allocator noise. Prints start/end/peak and the least-squares slope over the second half.
//
//   npm run build:ts && node bench/train-memory.js [--steps 500] [--json FILE]
const fs = require('fs');
const os = require('os');
const path = require('path');
const sharp = require('sharp');
const { parseOptions, median } = require('./common');

const root = path.resolve(__dirname, '..');
const lib = process.env.CUSTOM_DIFFUSION_LIB || path.join(root, 'lib');

function args() {
  return parseOptions({ steps: 500, json: null });
}

async function writePattern(file, w, h, seed) {
  const buf = Buffer.alloc(w * h * 3);
  for (let y = 0; y < h; y++)
    for (let x = 0; x < w; x++) {
      const o = (y * w + x) * 3;
      buf[o] = (x * 7 + seed * 13) & 255;
      buf[o + 1] = (y * 5 + seed * 29) & 255;
      buf[o + 2] = Math.imul(x * 73856093 ^ y * 19349663 ^ seed, 2654435761) >>> 24;
    }
  fs.mkdirSync(path.dirname(file), { recursive: true });
  await sharp(buf, { raw: { width: w, height: h, channels: 3 } }).png().toFile(file);
}

function slope(ys) {
  const n = ys.length;
  const mx = (n - 1) / 2;
  const my = ys.reduce((s, y) => s + y, 0) / n;
  let num = 0;
  let den = 0;
  ys.forEach((y, x) => {
    num += (x - mx) * (y - my);
    den += (x - mx) ** 2;
  });
  return num / den;
}

async function main() {
  const cfg = args();
  const cd = require(lib);
  cd.setNumThreads(2);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cd-train-memory-'));
  try {
    for (let i = 0; i < 4; i++) await writePattern(path.join(dir, 'instance', `${i}.png`), 96, 80, i + 1);
    for (let i = 0; i < 8; i++) await writePattern(path.join(dir, 'class', `${i}.png`), 72, 96, i + 11);
    const rss = [];
    const tensors = [];
    const run = cd.train({
      pretrainedModel: path.join(root, 'test', 'fixtures', 'parity', 'sd1', 'model'),
      concepts: [
        {
          instancePrompt: 'photo of a <new1> man',
          instanceDataDir: path.join(dir, 'instance'),
          classPrompt: 'photo of a man',
          classDataDir: path.join(dir, 'class'),
        },
      ],
      modifierTokens: ['<new1>'],
      initializerTokens: ['man</w>'],
      resolution: 128,
      trainBatchSize: 1,
      learningRate: 1e-5,
      maxTrainSteps: cfg.steps,
      checkpointingSteps: 100,
      outputDir: path.join(dir, 'out'),
      seed: 0,
    });
    run.on('step', (e) => {
      if (global.gc) global.gc();
      rss.push(process.memoryUsage().rss / 2 ** 20);
      tensors.push(cd.liveTensors());
      if (e.step % 50 === 0) console.log(`step ${e.step}: rss ${rss.at(-1).toFixed(1)} MiB, live tensors ${tensors.at(-1)}, loss ${e.loss.toFixed(4)}`);
    });
    await run.result;
    const warm = Math.min(10, rss.length - 1);
    const half = rss.slice(Math.floor(rss.length / 2));
    const result = {
      benchmark: 'train-memory',
      date: new Date().toISOString(),
      steps: cfg.steps,
      rssStartMiB: rss[warm],
      rssEndMiB: rss.at(-1),
      rssPeakMiB: Math.max(...rss),
      rssSlopeKiBPerStepSecondHalf: slope(half) * 1024,
      // Medians of the first and last fifth (checkpoints every 100 steps make single samples jumpy).
      rssMedianFirstFifthMiB: median(rss.slice(warm, Math.max(warm + 1, Math.floor(rss.length / 5)))),
      rssMedianLastFifthMiB: median(rss.slice(Math.floor((4 * rss.length) / 5))),
      liveTensorsStart: tensors[warm],
      liveTensorsEnd: tensors.at(-1),
    };
    console.log(
      `RSS after ${warm} steps ${result.rssStartMiB.toFixed(1)} MiB, after ${cfg.steps} ${result.rssEndMiB.toFixed(1)} MiB ` +
        `(peak ${result.rssPeakMiB.toFixed(1)}, slope over the second half ${result.rssSlopeKiBPerStepSecondHalf.toFixed(2)} KiB/step); ` +
        `live tensors ${result.liveTensorsStart} → ${result.liveTensorsEnd}`,
    );
    if (cfg.json) fs.writeFileSync(cfg.json, JSON.stringify(result, null, 2) + '\n');
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
