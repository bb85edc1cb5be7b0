import * as fs from 'fs';
import * as path from 'path';
import { FileError, InvalidArgumentError } from '../../src';
import { findWeightFiles, readConfigText, readModelIndex } from '../../src/model/files';
import { repoRoot, tempDir } from '../helpers/env';

describe('finding a component’s files', () => {
  let t: { dir: string; cleanup: () => void };
  beforeEach(() => (t = tempDir()));
  afterEach(() => t.cleanup());
  const touch = (name: string, content = '') => fs.writeFileSync(path.join(t.dir, name), content);

  it('prefers safetensors, then the variant, then .bin', () => {
    touch('diffusion_pytorch_model.bin');
    expect(findWeightFiles(t.dir, 'diffusion_pytorch_model')).toEqual({
      format: 'bin',
      files: [path.join(t.dir, 'diffusion_pytorch_model.bin')],
    });
    touch('diffusion_pytorch_model.safetensors');
    expect(findWeightFiles(t.dir, 'diffusion_pytorch_model').format).toBe('safetensors');
    touch('diffusion_pytorch_model.fp16.safetensors');
    expect(findWeightFiles(t.dir, 'diffusion_pytorch_model', { variant: 'fp16' }).files).toEqual([
      path.join(t.dir, 'diffusion_pytorch_model.fp16.safetensors'),
    ]);
    expect(findWeightFiles(t.dir, 'diffusion_pytorch_model').files[0]).toMatch(/model\.safetensors$/);
  });

  it('reads sharded weights from the index', () => {
    touch('model-00001-of-00002.safetensors');
    touch('model-00002-of-00002.safetensors');
    touch(
      'model.safetensors.index.json',
      JSON.stringify({ weight_map: { a: 'model-00001-of-00002.safetensors', b: 'model-00002-of-00002.safetensors', c: 'model-00001-of-00002.safetensors' } }),
    );
    expect(findWeightFiles(t.dir, 'model').files.map((f) => path.basename(f))).toEqual([
      'model-00001-of-00002.safetensors',
      'model-00002-of-00002.safetensors',
    ]);
    fs.rmSync(path.join(t.dir, 'model-00002-of-00002.safetensors'));
    expect(() => findWeightFiles(t.dir, 'model')).toThrow(/The shard .*model-00002-of-00002.safetensors named by .* does not exist/);
  });

  it('says what it looked for when there are no weights', () => {
    expect(() => findWeightFiles(t.dir, 'model', { variant: 'fp16' })).toThrow(FileError);
    expect(() => findWeightFiles(t.dir, 'model', { variant: 'fp16' })).toThrow(
      /No weights in .*: looked for model\.fp16\.safetensors, model\.fp16\.safetensors\.index\.json, model\.safetensors, .*model\.bin/,
    );
    expect(() => findWeightFiles(path.join(t.dir, 'nope'), 'model')).toThrow(/does not exist/);
    expect(() => findWeightFiles(t.dir, 'model', { variant: '../x' })).toThrow(InvalidArgumentError);
  });

  it('reports a missing config file by name', () => {
    expect(() => readConfigText(t.dir)).toThrow(/config\.json does not exist/);
  });

  it('reads model_index.json components and settings', () => {
    const index = readModelIndex(path.join(repoRoot, 'test', 'fixtures', 'parity', 'sd1', 'model'));
    expect(index.className).toBe('StableDiffusionPipeline');
    expect(index.components.unet).toEqual(['diffusers', 'UNet2DConditionModel']);
    expect(index.components.text_encoder).toEqual(['transformers', 'CLIPTextModel']);
    expect(index.components.tokenizer).toEqual(['transformers', 'CLIPTokenizer']);
    expect(index.components.vae).toEqual(['diffusers', 'AutoencoderKL']);
    expect(index.components.scheduler?.[1]).toMatch(/Scheduler$/);
    touch('model_index.json', '{bad');
    expect(() => readModelIndex(t.dir)).toThrow(/model_index\.json is not valid JSON/);
  });
});
