// A first program: make tensors, save them to a safetensors file with metadata, load them back.
// Run from a checkout with `node examples/safetensors-roundtrip.js` (after `npm run build:ts`).
const os = require('os');
const path = require('path');
const fs = require('fs');
const { Tensor, Generator, saveSafetensors, loadSafetensors, readSafetensorsHeader } = require('..');

async function main() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'customdiff-'));
  const file = path.join(dir, 'example.safetensors');
  const weight = Tensor.randn([320, 768], { generator: new Generator(42) });
  const half = await weight.to({ dtype: 'float16' });
  await saveSafetensors(file, { 'attn2.to_k.weight': weight, 'attn2.to_v.weight': half }, { format: 'pt', note: 'hello' });

  const header = await readSafetensorsHeader(file);
  console.log(`wrote ${file} (${fs.statSync(file).size} bytes)`);
  for (const e of header.entries) console.log(`  ${e.name}: ${e.dtype} [${e.shape.join(', ')}]`);
  console.log(`  metadata: ${JSON.stringify(header.metadata)}`);

  const { tensors } = await loadSafetensors(file, { dtype: 'float32' });
  const a = weight.toArray();
  const b = tensors['attn2.to_k.weight'].toArray();
  const same = a.length === b.length && a.every((v, i) => v === b[i]);
  console.log(`round trip of attn2.to_k.weight is ${same ? 'bit-exact' : 'DIFFERENT'}`);
  fs.rmSync(dir, { recursive: true, force: true });
  if (!same) process.exitCode = 1;
}

main().catch((e) => {
  console.error(`${e.name}: ${e.message}`);
  process.exitCode = 1;
});
