/**
 * `customdiff compose`: merges single-concept deltas into one by the paper's closed-form
 * constrained optimisation (composenW, diffusers-variant prompts). Concept k's token becomes `<newk>`.
 */
import { Command, InvalidArgumentError as CommanderArgumentError } from 'commander';
import * as fs from 'fs';
import * as path from 'path';
import { composeDeltas } from '../delta/compose';
import { openDelta } from '../delta/foreign';
import { readSafetensorsHeader } from '../core/safetensors';
import type { Delta } from '../delta/file';
import { defineAction } from './action';
import {
  addCommonOptions,
  addDeviceOptions,
  addExamples,
  addOverwriteOption,
  checkOutputFile,
  collectArg,
  intArg,
  usageError,
  type DeviceOptions,
  type OverwriteOptions,
} from './options';
import type { Progress } from './output';

export interface ComposeCliOptions extends OverwriteOptions, DeviceOptions {
  delta?: string[];
  category?: string[];
  model?: string;
  output?: string;
  captions?: string;
  maxCaptions?: number;
  force?: boolean;
}

/** `--category "wooden pot"` (repeatable), or several joined with "+" as the original `--categories`. */
function categoryArg(value: string, previous: string[] | undefined): string[] {
  const parts = value.split('+').map((c) => c.trim());
  if (parts.some((c) => c === '')) throw new CommanderArgumentError('expected a category such as "wooden pot" (several may be joined with "+").');
  return [...(previous ?? []), ...parts];
}

export function composeCommand(): Command {
  const cmd = new Command('compose')
    .summary('merge single-concept deltas into one (closed form)')
    .description(
      'Merge single-concept deltas into one delta by the closed-form optimisation of the paper: each concept keeps its ' +
        'behaviour on its own prompts, everything else stays close to the base model. Concept k (in --delta order) gets the token <newk>.',
    )
    .option('-d, --delta <file>', 'a single-concept delta (repeat once per concept, in order)', collectArg)
    .option('-c, --category <name>', 'the category of the delta at the same position, e.g. "wooden pot" (repeat; or join with "+")', categoryArg)
    .option('-m, --model <dir>', 'the base model the deltas were trained on (a diffusers folder)')
    .option('-o, --output <file>', 'where to write the merged delta')
    .option('--captions <file>', 'regularisation captions, one per line (default: the 1300 captions shipped with the library)')
    .option('--max-captions <n>', "use the first n captions (default 200, as the paper's code)", intArg(1))
    .option('--force', 'merge even when the deltas record different base models');
  addDeviceOptions(cmd, { device: false });
  addOverwriteOption(cmd);
  addCommonOptions(cmd);
  addExamples(cmd, [
    'customdiff compose --delta pot/delta.safetensors --delta cat/delta.safetensors \\\n      --category "wooden pot" --category cat --model models/sd15 -o pot+cat.safetensors',
    'customdiff compose -d a.safetensors -d b.safetensors -c "wooden pot+cat" -m models/sd15 -o merged.safetensors --captions my-captions.txt',
  ]);
  return defineAction<ComposeCliOptions>(cmd, async (ctx) => {
    const o = ctx.opts;
    const deltas = o.delta ?? [];
    const categories = o.category ?? [];
    if (deltas.length < 1) throw usageError('compose needs --delta once per concept (at least one; usually two or more)');
    if (categories.length !== deltas.length) {
      throw usageError(`compose got ${deltas.length} --delta but ${categories.length} --category; give one category per delta, in the same order`);
    }
    if (!o.model) throw usageError('compose needs --model: the base model folder the deltas were trained on');
    if (!o.output) throw usageError('compose needs --output: where to write the merged delta (e.g. -o merged.safetensors)');
    if (o.captions !== undefined && !fs.existsSync(o.captions)) throw usageError(`--captions ${o.captions} does not exist; give a text file with one caption per line`);
    for (const d of deltas) if (!fs.existsSync(d)) throw usageError(`--delta ${d} does not exist; check the path`);
    const output = path.resolve(o.output);
    if (deltas.some((d) => path.resolve(d) === output)) throw usageError(`--output ${output} is one of the inputs; choose another name`);
    checkOutputFile(output, o.overwrite);

    // Our files are passed by path (the merge records them); original formats are read first.
    const inputs: (string | Delta)[] = [];
    for (const d of deltas) {
      const ours = d.endsWith('.safetensors') && (await readSafetensorsHeader(d)).metadata.format === 'custom-diffusion-delta';
      inputs.push(ours ? d : await openDelta(d));
    }
    const bars: Record<string, Progress> = {};
    const r = await composeDeltas({
      deltas: inputs,
      categories,
      baseModel: o.model,
      regularizationCaptions: o.captions,
      maxCaptions: o.maxCaptions,
      output,
      force: o.force,
      signal: ctx.signal,
      onProgress: (p) => {
        const bar = (bars[p.stage] ??= ctx.reporter.progress({ label: `compose: ${p.stage}`, total: p.total, unit: p.stage === 'merge' ? 'layer' : 'step' }));
        bar.update(p.done);
        if (p.done >= p.total) bar.stop();
      },
    });
    for (const b of Object.values(bars)) b.stop();
    const worst = Math.max(...r.layers.map((l) => l.relConstraintResidual));
    if (worst > 1e-2) {
      ctx.reporter.warn(
        `the merged weights miss the concepts' own outputs by up to ${(100 * worst).toFixed(1)}% (relative constraint residual); ` +
          'the concepts may conflict (overlapping categories) — inspect the result, or merge fewer concepts',
      );
    }
    const summary = {
      output,
      concepts: r.concepts,
      tokens: r.delta.tokens,
      layers: r.layers.length,
      targetRows: r.targetRows,
      duplicateRows: r.duplicateRows,
      regRows: r.regRows,
      regCaptions: r.regCaptions,
      solver: r.solver,
      maxRelConstraintResidual: worst,
    };
    const lines = r.concepts.map((c) => `  ${c.token ?? '(no token)'} ${c.category}  ← ${c.source}`);
    ctx.reporter.result(`Merged ${r.concepts.length} concepts over ${r.layers.length} layers (${r.regCaptions} regularisation captions):\n${lines.join('\n')}\n${output}`, summary);
  });
}
