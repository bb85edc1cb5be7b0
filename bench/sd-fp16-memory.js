#!/usr/bin/env node
'use strict';
// Resident memory of a whole SD folder loaded in float16 and run once through the text encoder,
// UNet and VAE decoder (every weight it uses is touched), against the size of the weights.
//   node bench/sd-fp16-memory.js FOLDER   (e.g. one made by test/parity/make_full_size.py)
const folder = process.argv[2];
if (!folder) { console.error('usage: node bench/sd-fp16-memory.js FOLDER'); process.exit(2); }
const fs = require('fs');
const cd = require(require('path').join(__dirname, '..', 'lib'));
const rss = () => Number(fs.readFileSync('/proc/self/status','utf8').match(/VmRSS:\s+(\d+)/)[1]) * 1024;
(async () => {
  cd.info();
  const r0 = rss();
  const t0 = Date.now();
  const sd = await cd.StableDiffusion.load(folder, { dtype: 'float16' });
  const r1 = rss();
  const ids = sd.tokenizer.encodeBatch(['a photo of a cat'], { padding: 'max_length', truncation: true });
  const ctx = await sd.textEncoder.encode(cd.Tensor.fromArray(BigInt64Array.from(ids[0].map(BigInt)), [1, 77]));
  const out = await sd.unet.forward(cd.Tensor.zeros([1, 4, 8, 8], { dtype: 'float16' }), 10, ctx);
  const img = await sd.vae.decode(cd.Tensor.zeros([1, 4, 8, 8], { dtype: 'float16' }));
  const r2 = rss();
  let weights = 0;
  for (const d of ['unet', 'text_encoder', 'vae']) for (const f of fs.readdirSync(folder + '/' + d)) if (f.endsWith('.safetensors') && !f.includes('fp16')) weights += fs.statSync(folder + '/' + d + '/' + f).size;
  console.log(JSON.stringify({ weightsBytes: weights, rssAfterLoad: r1 - r0, rssAfterForward: r2 - r0, ratio: +((r2 - r0) / weights).toFixed(3), loadMs: Date.now() - t0, out: out.shape, img: img.shape }));
})().catch(e => { console.error(e); process.exit(1); });
