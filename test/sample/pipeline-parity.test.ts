import * as fs from 'fs';
import * as path from 'path';
import { StableDiffusion, readDelta, type SchedulerKind } from '../../src';
import { loadSafetensors } from '../../src/core/safetensors';
import { parityDir, relError } from '../helpers/numeric';

// Whole generations against diffusers' StableDiffusionPipeline (test/parity/make_pipeline_reference.py):
// given initial latents, guidance 6, 6 steps; the decoded float image must agree to 1e-4 relative.
const KIND: Record<string, SchedulerKind> = { ddim: 'ddim', pndm: 'pndm', dpmpp_2m: 'dpmsolver++', euler: 'euler' };
const TOL = 1e-4;

interface PipelineCase {
  scheduler: string;
  prompts: string[];
  negative_prompts: string[];
  steps: number;
  guidance_scale: number;
  delta: boolean;
}

describe.each([['sd1'], ['sd2']])('generation parity with StableDiffusionPipeline (%s)', (config) => {
  const dir = path.join(parityDir(config), 'pipeline');
  const manifest = JSON.parse(fs.readFileSync(path.join(dir, 'manifest.json'), 'utf8')) as { cases: Record<string, PipelineCase> };
  let sd: StableDiffusion;
  let tensors: Awaited<ReturnType<typeof loadSafetensors>>['tensors'];

  beforeAll(async () => {
    sd = await StableDiffusion.load(path.join(parityDir(config), 'model'));
    tensors = (await loadSafetensors(path.join(dir, 'cases.safetensors'))).tensors;
  });
  afterAll(() => sd?.dispose());

  it.each(Object.keys(manifest.cases).map((name) => [name]))('%s', async (name) => {
    const c = manifest.cases[name];
    const deltas = c.delta ? [await readDelta(path.join(dir, 'delta.safetensors'))] : [];
    const result = await sd.generateBatch({
      requests: [{ prompt: c.prompts, negativePrompt: c.negative_prompts, deltas, seed: 0 }],
      latents: tensors[`latents.${name}`],
      steps: c.steps,
      guidanceScale: c.guidance_scale,
      scheduler: KIND[c.scheduler],
      returnTensors: true,
    });
    const err = await relError(result.tensors!.images, tensors[`image.${name}`]);
    expect(err).toBeLessThan(TOL);
    expect(result.images).toHaveLength(c.prompts.length);
    expect(result.images[0].data).toHaveLength(32 * 32 * 3);
    if (c.delta) {
      // The concept must matter: without it the image is far from the reference.
      const plain = await sd.generateBatch({
        requests: [{ prompt: c.prompts, negativePrompt: c.negative_prompts, seed: 0 }],
        latents: tensors[`latents.${name}`],
        steps: c.steps,
        guidanceScale: c.guidance_scale,
        scheduler: KIND[c.scheduler],
        returnTensors: true,
      });
      expect(await relError(plain.tensors!.images, tensors[`image.${name}`])).toBeGreaterThan(100 * TOL);
    }
  });
});
