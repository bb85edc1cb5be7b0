#!/usr/bin/env node
/**
 * Writes a PNG contact sheet of the toy world (src/toy) for a person to look at: world samples,
 * the held-out combinations, and the demo's emblems, each tile enlarged with nearest-neighbour
 * scaling. A caption list with the judge's verdict on every tile goes to a .txt next to the PNG.
 *
 *   npm run build:ts && node scripts/toy-world-preview.js [out.png] [--seed N] [--n N] [--scale K]
 *                                                         [--resolution R] [--noise S] [--blur S]
 *
 * Defaults: toy-world-preview.png in the current folder, seed 0, 48 world samples, scale 4,
 * resolution 32. --noise/--blur degrade every tile as the judge's robustness tests do.
 */
'use strict';
const fs = require('fs');
const path = require('path');

function parseArgs(argv) {
  const o = { out: 'toy-world-preview.png', seed: 0, n: 48, scale: 4, resolution: 32, noise: 0, blur: 0 };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const num = () => {
      const v = Number(argv[++i]);
      if (!Number.isFinite(v)) throw new Error(`${a} needs a number`);
      return v;
    };
    if (a === '--seed') o.seed = num();
    else if (a === '--n') o.n = num();
    else if (a === '--scale') o.scale = num();
    else if (a === '--resolution') o.resolution = num();
    else if (a === '--noise') o.noise = num();
    else if (a === '--blur') o.blur = num();
    else if (a === '-h' || a === '--help') {
      console.log('usage: node scripts/toy-world-preview.js [out.png] [--seed N] [--n N] [--scale K] [--resolution R] [--noise S] [--blur S]');
      process.exit(0);
    } else if (a.startsWith('--')) throw new Error(`unknown option ${a}`);
    else o.out = a;
  }
  return o;
}

function loadToy() {
  const lib = path.join(__dirname, '..', 'lib', 'toy', 'index.js');
  if (!fs.existsSync(lib)) {
    console.error('lib/toy is not built: run `npm run build:ts` first.');
    process.exit(1);
  }
  return {
    toy: require(lib),
    images: require(path.join(__dirname, '..', 'lib', 'train', 'images.js')),
    Rng: require(path.join(__dirname, '..', 'lib', 'train', 'rng.js')).Rng,
  };
}

async function main() {
  const o = parseArgs(process.argv.slice(2));
  const { toy, images, Rng } = loadToy();
  const sharp = images.loadSharp();
  const R = o.resolution;
  const tiles = [];
  const lines = [];
  const degrade = (img, i) => (o.noise || o.blur ? toy.degradeImage(img, { noiseSigma: o.noise, blurSigma: o.blur, seed: i }) : img);

  // 1. world samples (the pretraining distribution)
  for (const s of toy.sampleToyDataset({ n: o.n, seed: o.seed, resolution: R })) {
    const img = degrade(s.image, tiles.length);
    const sc = toy.scoreToyImage(img, s.spec);
    const j = sc.judgement;
    tiles.push(img);
    lines.push(`sample ${s.index}: ${s.caption} | judge: ${j.size?.name} ${j.colour?.name} ${j.shape?.name}${j.shape?.strict ? '' : ' (not strict)'} on ${j.background.name} | ${sc.all ? 'OK' : 'MISMATCH'}`);
  }
  // 2. one picture of each held-out combination (never in pretraining)
  toy.TOY_HELD_OUT.forEach(([shape, colour, background], k) => {
    const spec = toy.placeToy({ shape, colour, background, size: k % 2 ? 'small' : 'large' }, Rng.fromSeed(o.seed, 1000 + k));
    const img = degrade(toy.renderToy(spec, { resolution: R }), tiles.length);
    const sc = toy.scoreToyImage(img, spec);
    tiles.push(img);
    lines.push(`held-out: ${toy.toyCaption(spec)} | ${sc.all ? 'OK' : 'MISMATCH'}`);
  });
  // 3. the demo's emblems, 8 of each
  for (const name of toy.TOY_EMBLEM_NAMES) {
    for (const s of toy.sampleEmblemImages(name, { n: 8, seed: o.seed, resolution: R })) {
      const img = degrade(s.image, tiles.length);
      const d = toy.detectEmblem(img, name);
      tiles.push(img);
      lines.push(`emblem ${name}: ${s.caption} | detector: ${d.present ? 'present' : 'absent'} (${d.score.toFixed(2)})`);
    }
  }

  const cols = 8;
  const gap = 2;
  const side = R * o.scale;
  const rows = Math.ceil(tiles.length / cols);
  const W = cols * side + (cols + 1) * gap;
  const H = rows * side + (rows + 1) * gap;
  const composites = await Promise.all(
    tiles.map(async (img, i) => ({
      input: await sharp(Buffer.from(img.data), { raw: { width: img.width, height: img.height, channels: 3 } })
        .resize(side, side, { kernel: 'nearest' })
        .png()
        .toBuffer(),
      left: gap + (i % cols) * (side + gap),
      top: gap + Math.floor(i / cols) * (side + gap),
    })),
  );
  await sharp({ create: { width: W, height: H, channels: 3, background: { r: 128, g: 128, b: 128 } } })
    .composite(composites)
    .png()
    .toFile(o.out);
  const txt = o.out.replace(/\.png$/i, '') + '.txt';
  fs.writeFileSync(txt, lines.map((l, i) => `[${Math.floor(i / cols)},${i % cols}] ${l}`).join('\n') + '\n');
  console.log(`wrote ${o.out} (${tiles.length} tiles, ${cols} per row: ${o.n} samples, ${toy.TOY_HELD_OUT.length} held-out, 16 emblems) and ${txt}`);
}

main().catch((e) => {
  console.error(e.message || e);
  process.exit(1);
});
