import * as fs from 'fs';
import * as path from 'path';
import { FileError, ModelError, StableDiffusion, Tensor } from '../../src';
import { repoRoot, tempDir } from '../helpers/env';

const fixture = (config: string) => path.join(repoRoot, 'test', 'fixtures', 'parity', config, 'model');

describe('loading a Stable Diffusion folder', () => {
  it.each([['sd1'], ['sd2']])('loads every component of the %s fixture as diffusers lays it out', async (config) => {
    const sd = await StableDiffusion.load(fixture(config));
    try {
      expect(sd.modelIndex.className).toBe('StableDiffusionPipeline');
      expect(sd.unet.config.crossAttentionDim).toBe(sd.textEncoder.hiddenSize);
      expect(sd.scheduler.className).toBe(config === 'sd1' ? 'PNDMScheduler' : 'DDIMScheduler');
      expect(sd.scheduler.predictionType).toBe(config === 'sd1' ? 'epsilon' : 'v_prediction');
      const ids = sd.tokenizer.encodeBatch(['a photo of a cat'], { padding: 'max_length', truncation: true });
      const ctx = await sd.textEncoder.encode(Tensor.fromArray(BigInt64Array.from(ids[0].map(BigInt)), [1, 77]));
      const out = await sd.unet.forward(Tensor.zeros([1, 4, 8, 8]), 10, ctx);
      expect(out.shape).toEqual([1, 4, 8, 8]);
      const img = await sd.vae.decode(Tensor.zeros([1, 4, 8, 8]));
      expect(img.shape[1]).toBe(3);
    } finally {
      sd.dispose();
    }
  });

  it('names every component it cannot load', async () => {
    const t = tempDir();
    try {
      const index = JSON.parse(fs.readFileSync(path.join(fixture('sd1'), 'model_index.json'), 'utf8'));
      index.unet = ['diffusers', 'UNet2DModel'];
      index.prior = ['diffusers', 'PriorTransformer'];
      delete index.vae;
      fs.writeFileSync(path.join(t.dir, 'model_index.json'), JSON.stringify(index));
      const err = await StableDiffusion.load(t.dir).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(ModelError);
      expect((err as Error).message).toMatch(/"unet" is a UNet2DModel/);
      expect((err as Error).message).toMatch(/"vae" is missing/);
      expect((err as Error).message).toMatch(/"prior" \(PriorTransformer\) is not supported/);
      await expect(StableDiffusion.load(path.join(t.dir, 'nope'))).rejects.toBeInstanceOf(FileError);
    } finally {
      t.cleanup();
    }
  });
});
