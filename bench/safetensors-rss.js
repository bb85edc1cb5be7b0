#!/usr/bin/env node
'use strict';
// Resident memory cost of loading a large fp16 safetensors file (issue: loading a 1.7 GB fp16 file
// must raise RSS by at most 1.1x its size). Writes a file shaped like an SD1.5 fp16 UNet (about
// 1.7 GB, random data), then in a fresh process loads it, reads every byte of every tensor (so each
// page really is resident), and reports the RSS increase against the file size.
//
//   node bench/safetensors-rss.js [sizeGB=1.72] [--keep]
const fs = require('fs');
const os = require('os');
const path = require('path');
const crypto = require('crypto');
const { spawnSync } = require('child_process');

const root = path.resolve(__dirname, '..');

function rssBytes() {
  const m = fs.readFileSync('/proc/self/status', 'utf8').match(/VmRSS:\s+(\d+) kB/);
  return Number(m[1]) * 1024;
}
function hwmBytes() {
  const m = fs.readFileSync('/proc/self/status', 'utf8').match(/VmHWM:\s+(\d+) kB/);
  return Number(m[1]) * 1024;
}

function writeFile(file, targetBytes) {
  // Shapes in the proportions of an SD UNet: many 1280/640/320-wide matrices and 3x3 convs.
  const shapes = [[1280, 1280, 3, 3], [640, 640, 3, 3], [1280, 1280], [5120, 1280], [1280, 5120], [320, 320, 3, 3], [1280, 768], [640], [320]];
  const entries = [];
  let offset = 0;
  let i = 0;
  while (offset < targetBytes) {
    const shape = shapes[i % shapes.length];
    const bytes = shape.reduce((a, b) => a * b, 1) * 2;
    entries.push({ name: `block.${i}.weight`, shape, begin: offset, end: offset + bytes });
    offset += bytes;
    i++;
  }
  const header = {};
  for (const e of entries) header[e.name] = { dtype: 'F16', shape: e.shape, data_offsets: [e.begin, e.end] };
  let text = JSON.stringify(header);
  while ((8 + text.length) % 8) text += ' ';
  const fd = fs.openSync(file, 'w');
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(text.length));
  fs.writeSync(fd, len);
  fs.writeSync(fd, text);
  const chunk = Buffer.alloc(64 << 20);
  let left = offset;
  while (left > 0) {
    const n = Math.min(left, chunk.length);
    crypto.randomFillSync(chunk, 0, n);
    // Random bits include NaN patterns; that does not matter for a memory measurement.
    fs.writeSync(fd, chunk, 0, n);
    left -= n;
  }
  fs.closeSync(fd);
  return { bytes: fs.statSync(file).size, tensors: entries.length };
}

async function measure(file, dtype) {
  const cd = require(path.join(root, 'lib'));
  cd.info(); // load LibTorch and the addon before the baseline
  if (global.gc) global.gc();
  const before = rssBytes();
  const t0 = process.hrtime.bigint();
  const { tensors } = await cd.loadSafetensors(file, dtype ? { dtype } : {});
  const loadMs = Number(process.hrtime.bigint() - t0) / 1e6;
  const afterLoad = rssBytes();
  let checksum = 0;
  for (const t of Object.values(tensors)) {
    const a = t.toArray(); // a transient copy; it touches every page of the tensor
    checksum = (checksum + a[a.length - 1]) % 65536;
    if (global.gc) global.gc();
  }
  const afterTouch = rssBytes();
  process.stdout.write(
    JSON.stringify({ dtype: dtype || 'file (float16)', before, afterLoad, afterTouch, peak: hwmBytes(), loadMs, checksum }) + '\n',
  );
}

async function main() {
  if (process.argv[2] === '--child') return measure(process.argv[3], process.argv[4]);
  const sizeGB = Number(process.argv.find((a) => /^\d/.test(a)) || 1.72);
  const keep = process.argv.includes('--keep');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cd-rss-'));
  const file = path.join(dir, 'unet.fp16.safetensors');
  try {
    const t0 = Date.now();
    const { bytes, tensors } = writeFile(file, sizeGB * 1e9);
    process.stderr.write(`wrote ${file}: ${(bytes / 1e9).toFixed(3)} GB, ${tensors} tensors, ${Date.now() - t0} ms\n`);
    const r = spawnSync(process.execPath, ['--expose-gc', __filename, '--child', file], { encoding: 'utf8' });
    if (r.status !== 0) throw new Error(r.stderr);
    const m = JSON.parse(r.stdout);
    const rise = m.afterTouch - m.before;
    const result = {
      fileBytes: bytes,
      rssRiseBytes: rise,
      ratio: +(rise / bytes).toFixed(3),
      rssRiseAfterLoadOnlyBytes: m.afterLoad - m.before,
      peakAboveBaselineBytes: m.peak - m.before,
      peakRatio: +((m.peak - m.before) / bytes).toFixed(3),
      loadMs: +m.loadMs.toFixed(1),
      target: 'ratio <= 1.1',
      pass: rise / bytes <= 1.1,
    };
    process.stdout.write(JSON.stringify(result, null, 2) + '\n');
    if (!result.pass) process.exitCode = 1;
  } finally {
    if (!keep) fs.rmSync(dir, { recursive: true, force: true });
  }
}

main().catch((e) => {
  process.stderr.write(String(e && e.stack ? e.stack : e) + '\n');
  process.exit(1);
});
