/**
 * The embedded toy model (models/toy) is a diffusers folder in every respect: diffusers'
 * StableDiffusionPipeline loads it as it is (transformers 5 checks config field types, so a float
 * written as 1 is refused), and its text encoder, UNet and VAE compute what ours compute.
 */
import * as fs from 'fs';
import * as path from 'path';
import { loadSafetensors } from '../../src/core/safetensors';
import { StableDiffusion } from '../../src/model/pipeline';
import { relError } from '../helpers/numeric';
import { repoRoot, runPython, tempDir } from '../helpers/env';
import { itWithPython } from '../helpers/python-torch';

jest.setTimeout(120_000);

const MODEL = path.join(repoRoot, 'models', 'toy');
const PROMPT = 'a small red circle on a blue background';

const SCRIPT = `
import sys, torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1], torch_dtype=torch.float32, safety_checker=None, requires_safety_checker=False)
ids = pipe.tokenizer([sys.argv[3]], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
g = torch.Generator().manual_seed(0)
latents = torch.randn(1, 4, 8, 8, generator=g)
with torch.no_grad():
    hidden = pipe.text_encoder(ids)[0]
    eps = pipe.unet(latents, 999, hidden).sample
    z = latents / pipe.vae.config.scaling_factor
    image = pipe.vae.decode(z).sample
save_file({"input_ids": ids.to(torch.int64), "hidden": hidden, "latents": latents, "eps": eps, "z": z, "image": image}, sys.argv[2])
`;

describe('models/toy with diffusers', () => {
  itWithPython(['torch', 'safetensors', 'diffusers', 'transformers'])('loads in StableDiffusionPipeline and computes what ours computes', async () => {
    const { dir, cleanup } = tempDir('cd-toy-interop-');
    const sd = await StableDiffusion.load(MODEL);
    try {
      const file = path.join(dir, 'ref.safetensors');
      runPython(['-c', SCRIPT, MODEL, file, PROMPT]);
      expect(fs.existsSync(file)).toBe(true);
      const ref = (await loadSafetensors(file)).tensors;
      expect(Array.from(ref.input_ids.toArray() as BigInt64Array, Number).slice(0, 10)).toEqual([49406, ...sd.tokenizer.encode(PROMPT), 49407]);
      const hidden = await sd.textEncoder.encode(ref.input_ids);
      expect(await relError(hidden, ref.hidden)).toBeLessThan(1e-5);
      const eps = await sd.unet.forward(ref.latents, 999, ref.hidden);
      expect(await relError(eps, ref.eps)).toBeLessThan(1e-5);
      const image = await sd.vae.decode(ref.z);
      expect(await relError(image, ref.image)).toBeLessThan(1e-5);
    } finally {
      sd.dispose();
      cleanup();
    }
  });

  test('its text encoder config writes CLIPTextConfig floats as floats', () => {
    const text = fs.readFileSync(path.join(MODEL, 'text_encoder', 'config.json'), 'utf8');
    for (const key of ['attention_dropout', 'initializer_factor', 'initializer_range', 'layer_norm_eps']) {
      expect(text).toMatch(new RegExp(`"${key}": -?\\d*\\.\\d+`));
    }
  });
});
