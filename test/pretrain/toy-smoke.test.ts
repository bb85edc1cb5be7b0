/**
 * The toy pretraining recipe end to end with tiny step counts: the folder it writes is a diffusers
 * Stable Diffusion folder that StableDiffusion.load reads and generates from, within the size
 * budget, and the same seed gives the same bytes.
 */
import { createHash } from 'crypto';
import * as fs from 'fs';
import * as path from 'path';
import { StableDiffusion } from '../../src/model/pipeline';
import { getNumThreads } from '../../src/core/runtime';
import { pretrainToy, type ToyPretrainOptions, type ToyPretrainEvent } from '../../src/pretrain';
import { tempDir } from '../helpers/env';

const TINY: Omit<ToyPretrainOptions, 'outDir'> = {
  seed: 3,
  threads: 2,
  vae: { steps: 3, batchSize: 4 },
  unet: { steps: 4, batchSize: 4, warmupSteps: 1 },
  cacheImages: 16,
  scaleImages: 16,
};

function hashFolder(dir: string): Record<string, string> {
  const out: Record<string, string> = {};
  const walk = (d: string) => {
    for (const e of fs.readdirSync(d, { withFileTypes: true }).sort((a, b) => a.name.localeCompare(b.name))) {
      const p = path.join(d, e.name);
      if (e.isDirectory()) walk(p);
      else out[path.relative(dir, p)] = createHash('sha256').update(fs.readFileSync(p)).digest('hex');
    }
  };
  walk(dir);
  return out;
}

test('a tiny run writes a loadable, deterministic diffusers folder', async () => {
  const { dir, cleanup } = tempDir('cd-pretrain-');
  try {
    const threadsBefore = getNumThreads();
    const events: ToyPretrainEvent[] = [];
    const a = await pretrainToy({ ...TINY, outDir: path.join(dir, 'a'), onEvent: (e) => events.push(e), logEvery: 1 });
    expect(getNumThreads()).toBe(threadsBefore);
    expect(events.filter((e) => e.phase === 'vae')).toHaveLength(3);
    expect(events.filter((e) => e.phase === 'unet')).toHaveLength(4);
    expect(a.bytes).toBeLessThanOrEqual(20e6);
    expect(a.scalingFactor).toBeGreaterThan(0);
    for (const f of [
      'model_index.json',
      'pretrain.json',
      'unet/config.json',
      'unet/diffusion_pytorch_model.safetensors',
      'vae/config.json',
      'vae/diffusion_pytorch_model.safetensors',
      'text_encoder/config.json',
      'text_encoder/model.safetensors',
      'tokenizer/vocab.json',
      'tokenizer/merges.txt',
      'scheduler/scheduler_config.json',
    ]) {
      expect(fs.existsSync(path.join(a.outDir, f))).toBe(true);
    }
    const sched = JSON.parse(fs.readFileSync(path.join(a.outDir, 'scheduler', 'scheduler_config.json'), 'utf8'));
    expect(sched).toMatchObject({ _class_name: 'DDIMScheduler', timestep_spacing: 'trailing' });
    expect(JSON.parse(fs.readFileSync(path.join(a.outDir, 'vae', 'config.json'), 'utf8')).scaling_factor).toBe(a.scalingFactor);
    // transformers 5 refuses CLIPTextConfig floats written as integers.
    const textConfig = fs.readFileSync(path.join(a.outDir, 'text_encoder', 'config.json'), 'utf8');
    expect(textConfig).toMatch(/"initializer_factor": 1\.0,/);
    expect(textConfig).toMatch(/"attention_dropout": 0\.0,/);
    expect(JSON.parse(textConfig).initializer_factor).toBe(1);
    // Nothing of the staging folder is left beside the result.
    expect(fs.readdirSync(dir)).toEqual(['a']);

    const sd = await StableDiffusion.load(a.outDir);
    try {
      expect(sd.textEncoder.baseVocabSize).toBe(49408);
      expect(sd.tokenizer.encode('a red circle on a blue background')).toEqual([320, 736, 7117, 525, 320, 1746, 5994]);
      const out = await sd.generate({ prompt: ['a small red circle on a blue background', ''], seed: 1, steps: 3, guidanceScale: 4.5 });
      expect(out.images).toHaveLength(2);
      for (const img of out.images) {
        expect([img.width, img.height]).toEqual([32, 32]);
        expect(img.data.length).toBe(32 * 32 * 3);
      }
    } finally {
      sd.dispose();
    }

    // Same seed, same options, same threads: the same files, byte for byte; another seed differs.
    const b = await pretrainToy({ ...TINY, outDir: path.join(dir, 'b') });
    expect(hashFolder(b.outDir)).toEqual(hashFolder(a.outDir));
  } finally {
    cleanup();
  }
});
