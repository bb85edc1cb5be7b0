import * as path from 'path';
import { TextEncoder, UNet } from '../../src';
import { applyDelta } from '../../src/delta/apply';
import { readDelta } from '../../src/delta/file';
import { attnProcToDiffusersName, compvisToDiffusersName, openDelta, readForeignDelta } from '../../src/delta/foreign';
import { repoRoot } from '../helpers/env';
import { maxAbsDiff, relError, values } from '../helpers/numeric';

const FIX = path.join(repoRoot, 'test', 'fixtures', 'compose');
const FOREIGN = path.join(FIX, 'foreign');
const MODEL = path.join(repoRoot, 'test', 'fixtures', 'parity', 'sd1', 'model');

describe('original delta formats', () => {
  it('maps CompVis and attn-processor names to diffusers names', () => {
    const s = 'transformer_blocks.0.attn2.to_k.weight';
    expect(compvisToDiffusersName(`model.diffusion_model.input_blocks.1.1.${s}`)).toBe(`down_blocks.0.attentions.0.${s}`);
    expect(compvisToDiffusersName(`model.diffusion_model.input_blocks.8.1.${s}`)).toBe(`down_blocks.2.attentions.1.${s}`);
    expect(compvisToDiffusersName(`model.diffusion_model.middle_block.1.${s}`)).toBe(`mid_block.attentions.0.${s}`);
    expect(compvisToDiffusersName(`model.diffusion_model.output_blocks.11.1.${s}`)).toBe(`up_blocks.3.attentions.2.${s}`);
    expect(compvisToDiffusersName('model.diffusion_model.out.2.weight')).toBeNull();
    expect(attnProcToDiffusersName('up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_out_custom_diffusion.0.bias')).toBe(
      'up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0.bias',
    );
  });

  it.each([['delta.bin'], ['delta_epoch=000001.ckpt'], [path.join('attn_procs', 'pytorch_custom_diffusion_weights.safetensors')]])(
    'reads %s as the same full delta',
    async (file) => {
      const ours = await readDelta(path.join(FIX, 'concept1.safetensors'));
      const d = await readForeignDelta(path.join(FOREIGN, file));
      expect(d.kind).toBe('full');
      expect(Object.keys(d.weights).sort()).toEqual(Object.keys(ours.weights).sort());
      for (const [n, t] of Object.entries(d.weights)) expect(await maxAbsDiff(t, ours.weights[n])).toBe(0);
      expect(d.tokens.map((t) => [t.token, t.id])).toEqual([['<new1>', 49408]]);
      expect(values(d.tokenRows['<new1>'])).toEqual(values(ours.tokenRows['<new1>']));
    },
  );

  it('openDelta dispatches on the format', async () => {
    expect((await openDelta(path.join(FIX, 'concept1.safetensors'))).baseModelFingerprint).toMatch(/^[0-9a-f]{64}$/);
    expect((await openDelta(path.join(FOREIGN, 'delta.bin'))).baseModelFingerprint).toBeNull();
  });

  it('reads a compressed delta.bin and applies it as W0 + u·v', async () => {
    const ours = await readDelta(path.join(FIX, 'concept1.safetensors'));
    const d = await readForeignDelta(path.join(FOREIGN, 'compressed_delta.bin'), { firstTokenId: 1514 });
    expect(d.kind).toBe('compressed');
    const unet = await UNet.load(path.join(MODEL, 'unet'));
    const enc = await TextEncoder.load(path.join(MODEL, 'text_encoder'));
    const applied = await applyDelta(d, { unet, textEncoder: enc });
    let worst = 0;
    for (const [n, t] of Object.entries(unet.allParameters((n) => n in ours.weights))) worst = Math.max(worst, await relError(t, ours.weights[n]));
    expect(worst).toBeLessThan(1e-5);
    expect(applied.tokenIds['<new1>']).toBe(1514);
    applied.unapply();
    unet.dispose();
    enc.dispose();
  });
});
