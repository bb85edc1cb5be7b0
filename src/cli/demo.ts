/**
 * `customdiff demo`: Custom Diffusion end to end on the embedded toy model, in a few minutes on a
 * CPU: two new concepts learnt from 8 pictures each, compressed, merged, and judged, with an HTML
 * report (see src/demo/demo.ts).
 */
import { Command } from 'commander';
import * as fs from 'fs';
import * as path from 'path';
import { runDemo, DEMO_CONCEPTS, DEMO_MODEL_DIR, type ConceptScores, type DemoEvent, type DemoStage, type DemoMetrics } from '../demo/demo';
import { TOY_EMBLEMS } from '../toy/world';
import { defineAction } from './action';
import { addCommonOptions, addDeviceOptions, addExamples, addOverwriteOption, intArg, numberArg, usageError, type DeviceOptions, type OverwriteOptions } from './options';
import { formatDuration, type Progress } from './output';

export interface DemoCliOptions extends OverwriteOptions, DeviceOptions {
  model?: string;
  outputDir?: string;
  steps?: number;
  learningRate?: number;
  tokenLearningRate?: number;
  seed?: number;
  classImages?: number;
  evalSeeds?: number;
  plainImages?: number;
  sampleSteps?: number;
}

const pct = (x: number): string => (Number.isFinite(x) ? `${(100 * x).toFixed(0)}%`.padStart(4) : '  – ');

/** The metrics as a short table for the terminal. */
export function metricsSummary(m: DemoMetrics): string {
  const [e1, e2] = DEMO_CONCEPTS;
  const [t1, t2] = Object.keys(m.merged.tokens);
  const p1 = `"${TOY_EMBLEMS[e1].noun}"`;
  const p2 = `"${TOY_EMBLEMS[e2].noun}"`;
  const row = (label: string, s: ConceptScores) => `  ${label.padEnd(34)}${pct(s.emblem_rate)}    ${pct(s.background_rate)}`;
  const lines = [
    `${'concept prompts'.padEnd(36)}found  background`,
    row(`base model, <new1> ${p1}`, m.base.concept1),
    row(`<new1> delta (${e1})`, m.delta1.concept),
    row('compressed delta (ratio 0.6)', m.compressed1.concept),
    row(`merged delta, ${t1} ${p1}`, m.merged.concept1),
    row(`base model, <new1> ${p2}`, m.base.concept2),
    row(`second delta (${e2})`, m.delta2.concept),
    row(`merged delta, ${t2} ${p2}`, m.merged.concept2),
    `${'plain prompts'.padEnd(36)}colour+background+shape`,
    `  ${'base model'.padEnd(34)}${pct(m.base.plain.accuracy)}`,
    `  ${'<new1> delta'.padEnd(34)}${pct(m.delta1.plain.accuracy)}`,
    `  ${'merged delta'.padEnd(34)}${pct(m.merged.plain.accuracy)}`,
  ];
  return lines.join('\n');
}

export function demoCommand(): Command {
  const cmd = new Command('demo')
    .summary('teach the embedded toy model two new concepts and write a report (a few minutes on a CPU)')
    .description(
      'Custom Diffusion end to end on the small model that ships with the package (trained on a world of coloured shapes): ' +
        'draw 8 pictures of a two-colour tile the model has never seen, train a <new1> delta with prior preservation, show that ' +
        '"a <new1> tile on a green background" draws it in the asked context while plain prompts draw what they drew before, ' +
        'compress the delta, train a second concept and merge both, then write report.html (grids, loss curves, metrics) in --output-dir.',
    )
    .option('-m, --model <dir>', `a toy-world model folder (default: the embedded one, ${path.relative(process.cwd(), DEMO_MODEL_DIR) || DEMO_MODEL_DIR})`)
    .option('-o, --output-dir <dir>', 'where the report and everything else go (default ./customdiff-demo)')
    .option('--steps <n>', 'training steps per concept (default 800)', intArg(0, 100_000))
    .option('--learning-rate <lr>', 'learning rate of the K/V weights (default 1e-3)', numberArg({ gt: 0 }))
    .option('--token-learning-rate <lr>', 'learning rate of the token (default 1e-2)', numberArg({ gt: 0 }))
    .option('--seed <n>', 'everything random follows from it (default 0)', intArg(0, 1_000_000))
    .option('--class-images <n>', 'class images for prior preservation (default 64)', intArg(1, 10_000))
    .option('--eval-seeds <n>', 'seeds per background for the concept prompts (default 3)', intArg(1, 1000))
    .option('--plain-images <n>', 'plain world prompts for the prior-preservation check (default 12)', intArg(1, 10_000))
    .option('--sample-steps <n>', 'denoising steps (default 25)', intArg(1, 1000));
  addDeviceOptions(cmd, { device: false });
  addOverwriteOption(cmd);
  addCommonOptions(cmd);
  addExamples(cmd, [
    'customdiff demo',
    'customdiff demo -o /tmp/demo --overwrite',
    'customdiff demo --model models/my-toy --steps 600 --json',
  ]);
  return defineAction<DemoCliOptions>(
    cmd,
    async (ctx) => {
      const o = ctx.opts;
      const outDir = path.resolve(o.outputDir ?? 'customdiff-demo');
      if (fs.existsSync(outDir) && !fs.statSync(outDir).isDirectory()) throw usageError(`--output-dir ${outDir} is a file; give a folder`);
      const r = ctx.reporter;
      let bar: Progress | undefined;
      let stageTotal = 0;
      const onProgress = (e: DemoEvent) => {
        if (e.type === 'stage') {
          r.event('stage', { stage: e.stage, index: e.index, stages: e.stages, title: e.title, total: e.total, unit: e.unit });
          r.info(`[${e.index}/${e.stages}] ${e.title}`);
          stageTotal = e.total;
          bar = r.progress({ label: e.stage, total: e.total, unit: e.unit, jsonEvents: false });
        } else if (e.type === 'progress') {
          r.event('progress', { stage: e.stage, done: e.done, total: e.total, ...(e.loss !== undefined ? { loss: e.loss } : {}) });
          bar?.update(Math.min(e.done, stageTotal), e.loss !== undefined ? { fields: { loss: e.loss.toFixed(4) } } : {});
        } else {
          bar?.stop();
          bar = undefined;
          r.event('stage-end', { stage: e.stage as DemoStage, seconds: e.seconds });
        }
      };
      const result = await runDemo({
        model: o.model,
        outDir,
        overwrite: o.overwrite,
        steps: o.steps,
        learningRate: o.learningRate,
        tokenLearningRate: o.tokenLearningRate,
        seed: o.seed,
        classImages: o.classImages,
        evalSeeds: o.evalSeeds,
        plainImages: o.plainImages,
        sampleSteps: o.sampleSteps,
        signal: ctx.signal,
        onProgress,
      });
      bar?.stop();
      r.result(`${metricsSummary(result.metrics)}\n\nDone in ${formatDuration(result.seconds)}. Report: ${result.reportPath}`, {
        report: result.reportPath,
        metricsFile: result.metricsPath,
        outputDir: result.outDir,
        seconds: result.seconds,
        files: result.files,
        metrics: result.metrics,
      });
    },
    { interruptMessage: 'stopping the demo' },
  );
}
