/**
 * End to end through bin/customdiff.js, as a user runs it, on the tiny SD1 fixture model: train
 * (one concept and two jointly) → inspect → compress → compose; --json events, exit codes, usage
 * errors, --overwrite, config files and presets, Ctrl-C with a checkpoint and resume.
 */
import * as fs from 'fs';
import * as path from 'path';
import { readSafetensorsHeader } from '../../src/core/safetensors';
import { tempDir } from '../helpers/env';
import { cli, cliAsync, events, FAST, MODEL, mtime, writeImageFolders } from './util';

let tmp: { dir: string; cleanup: () => void };
let dirs: { inst1: string; inst2: string; cls: string };
let cwd: string;

beforeAll(async () => {
  tmp = tempDir('cd-cli-');
  cwd = tmp.dir;
  dirs = await writeImageFolders(tmp.dir);
});
afterAll(() => tmp.cleanup());

const single = () => [
  'train',
  ...FAST,
  '--instance-dir', dirs.inst1,
  '--instance-prompt', 'photo of a <new1> man',
  '--class-dir', dirs.cls,
  '--class-prompt', 'photo of a man',
];

describe('customdiff --help', () => {
  it('lists every command, and each command has --help with examples', () => {
    const top = cli(['--help'], cwd);
    expect(top.code).toBe(0);
    for (const c of ['train', 'sample', 'class-images', 'retrieve', 'compose', 'compress', 'convert', 'inspect', 'doctor']) {
      expect(top.stdout).toMatch(new RegExp(`^  ${c} `, 'm'));
      const r = cli([c, '--help'], cwd);
      expect({ c, code: r.code }).toEqual({ c, code: 0 });
      expect(r.stdout).toMatch(/\nExamples:\n(  #.*\n)*  \$ customdiff /);
    }
  });
});

describe('customdiff train', () => {
  it('trains one concept with --json: start, steps, checkpoints, result; files written', () => {
    const r = cli([...single(), '--max-train-steps', '3', '--checkpointing-steps', '2', '--gradient-checkpointing', '-o', 'single', '--json'], cwd);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const ev = events(r.stdout);
    expect(ev[ev.length - 1].event).toBe('result');
    const steps = ev.filter((e) => e.event === 'step');
    expect(steps.map((e) => e.step)).toEqual([1, 2, 3]);
    for (const s of steps) {
      expect(typeof s.loss).toBe('number');
      expect(s.maxSteps).toBe(3);
      expect(s.etaSeconds).toBeGreaterThanOrEqual(0);
    }
    expect(ev.find((e) => e.event === 'start')).toMatchObject({ device: expect.any(String), maxTrainSteps: 3, modifierTokens: ['<new1>'] });
    expect(ev.filter((e) => e.event === 'checkpoint').map((e) => [e.step, e.reason])).toEqual([[2, 'interval']]);
    const result = ev[ev.length - 1];
    const out = path.join(cwd, 'single');
    expect(result.deltaPath).toBe(path.join(out, 'delta.safetensors'));
    expect(result.steps).toBe(3);
    expect(result.tokens).toEqual([{ token: '<new1>', id: 1514, initializer: 'man</w>', initializerId: 786 }]);
    for (const f of ['delta.safetensors', 'run.json', 'checkpoint-2/state.json']) expect(fs.existsSync(path.join(out, f))).toBe(true);
    const run = JSON.parse(fs.readFileSync(path.join(out, 'run.json'), 'utf8'));
    expect(run.status).toBe('completed');
    expect(run.options.resolved.scaledLearningRate).toBeCloseTo(2e-4, 12); // 1e-4 × batch 1 × 2 (prior)
    expect(run.options.gradientCheckpointing).toBe(true);
  });

  it('prints progress lines and a result for people when not on a terminal; --quiet keeps only the result', () => {
    const r = cli([...single(), '--max-train-steps', '2', '-o', 'plain'], cwd);
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/^Trained 2 steps .*last loss \d/m);
    expect(r.stdout.trim().split('\n').pop()).toBe(path.join(cwd, 'plain', 'delta.safetensors'));
    expect(r.stderr).toMatch(/train: step 1\/2 \| loss \d+\.\d{4} \| lr 2\.0e-4 \| [\d.]+ (step\/s|s\/step) \| ETA \S+ \| elapsed/);
    expect(r.stderr).toMatch(/train: step 2\/2 /);
    const q = cli([...single(), '--max-train-steps', '1', '-o', 'quiet', '--quiet'], cwd);
    expect(q.code).toBe(0);
    expect(q.stderr).not.toMatch(/train: step/);
    expect(q.stdout).toMatch(/^Trained 1 steps/m);
  });

  it('never replaces an earlier run without --overwrite (exit 2, says what to do)', () => {
    const delta = path.join(cwd, 'single', 'delta.safetensors');
    const before = mtime(delta);
    const r = cli([...single(), '--max-train-steps', '1', '-o', 'single'], cwd);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/already holds delta\.safetensors and run\.json.*--overwrite/);
    expect(mtime(delta)).toBe(before);
    // Checkpoints alone also protect the folder: --resume or --overwrite.
    fs.mkdirSync(path.join(cwd, 'ck-only'));
    fs.cpSync(path.join(cwd, 'single', 'checkpoint-2'), path.join(cwd, 'ck-only', 'checkpoint-2'), { recursive: true });
    const c = cli([...single(), '--max-train-steps', '1', '-o', 'ck-only'], cwd);
    expect(c.code).toBe(2);
    expect(c.stderr).toMatch(/already holds checkpoints \(checkpoint-2\); pass --resume .* --overwrite/);

    const o = cli([...single(), '--max-train-steps', '1', '-o', 'single', '--overwrite', '--json'], cwd);
    expect(o.code).toBe(0);
    expect(mtime(delta)).toBeGreaterThan(before);
    // --overwrite starts over: the earlier run's checkpoints are gone.
    expect(fs.existsSync(path.join(cwd, 'single', 'checkpoint-2'))).toBe(false);
  });

  it('trains two concepts jointly from a concepts list in the original format', () => {
    const list = path.join(cwd, 'concepts.json');
    fs.writeFileSync(
      list,
      JSON.stringify([
        { instance_prompt: 'photo of a <new1> man', class_prompt: 'photo of a man', instance_data_dir: dirs.inst1, class_data_dir: dirs.cls },
        { instance_prompt: 'photo of a <new2> dog', class_prompt: 'photo of a man', instance_data_dir: dirs.inst2, class_data_dir: dirs.cls },
      ]),
    );
    const r = cli(['train', ...FAST, '--initializer-token', 'a</w>', '--concepts-list', list, '--max-train-steps', '2', '-o', 'joint', '--json'], cwd);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const result = events(r.stdout).pop()!;
    expect((result.tokens as { token: string; id: number }[]).map((t) => [t.token, t.id])).toEqual([
      ['<new1>', 1514],
      ['<new2>', 1515],
    ]);
  });

  it('reads options from --config (the command line wins) and applies --preset under both', () => {
    const config = path.join(cwd, 'face.json');
    fs.writeFileSync(
      config,
      JSON.stringify({
        model: MODEL,
        'instance-dir': dirs.inst1,
        instance_prompt: 'photo of a <new1> man',
        classDir: dirs.cls,
        'class-prompt': 'photo of a man',
        resolution: 32,
        'train-batch-size': 1,
        noaug: true,
        'initializer-token': 'man</w>',
        'max-train-steps': 5,
        preset: 'face',
        'output-dir': 'face',
      }),
    );
    const r = cli(['train', '--config', config, '--max-train-steps', '1', '--token-learning-rate', '2e-4', '--json'], cwd);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const run = JSON.parse(fs.readFileSync(path.join(cwd, 'face', 'run.json'), 'utf8'));
    expect(run.steps).toBe(1); // the command line beat the file's 5 and the preset's 750
    expect(run.options.learningRate).toBe(5e-6); // from the face preset
    expect(run.options.tokenLearningRate).toBe(2e-4);
    expect(run.options.resolution).toBe(32); // the file beat the preset's 512

    const bad = path.join(cwd, 'bad.json');
    fs.writeFileSync(bad, JSON.stringify({ 'max-train-stepz': 3 }));
    const b = cli(['train', '--config', bad], cwd);
    expect(b.code).toBe(2);
    expect(b.stderr).toMatch(/unknown option "max-train-stepz".*known: .*max-train-steps/);
    fs.writeFileSync(bad, JSON.stringify({ 'max-train-steps': 'many' }));
    expect(cli(['train', '--config', bad], cwd).code).toBe(2);
    expect(cli(['train', '--config', path.join(cwd, 'missing.json')], cwd).stderr).toMatch(/Cannot read the config file/);
  });

  it('exits 2 with a message that says what to do on usage errors', () => {
    const cases: [string[], RegExp][] = [
      [['train', '-m', MODEL, '-o', 'x'], /--instance-dir .* --instance-prompt/],
      [['train', '-m', MODEL, '--instance-dir', dirs.inst1, '--instance-prompt', 'p'], /--output-dir/],
      [['train', '--max-train-steps', 'abc'], /expected an integer/],
      [['train', '--freeze-model', 'everything'], /Allowed choices are crossattn_kv, crossattn/],
      [['train', '--no-such-option'], /unknown option/],
      [['train', '--device', 'tpu'], /expected cpu, cuda, cuda:N or auto/],
      [[...single(), '-o', 'y', '--concepts-list', 'c.json'], /either --concepts-list .* or/],
      [['train', ...FAST, '--instance-dir', dirs.inst1, '--instance-prompt', 'p', '--class-dir', 'no-such-dir', '-o', 'z'], /--class-dir no-such-dir does not exist; give --class-prompt/],
      [['train', '-o', 'nothing-here', '--resume'], /no checkpoint in .*nothing-here/],
      [['compress', 'x.safetensors', '-m', MODEL, '--ratio', '0.5', '--rank', '2'], /cannot be used with option '--rank/],
      [['compress', 'x.safetensors', '--ratio', '1.5'], /expected a number > 0 and ≤ 1/],
      [['compose', '-d', 'a', '-c', 'x', '-c', 'y', '-m', MODEL, '-o', 'm.safetensors'], /1 --delta but 2 --category/],
      [['inspect'], /missing required argument 'delta'/],
      [['no-such-command'], /unknown command/],
      [['train', '--quiet', '--verbose'], /cannot be used with option '-v, --verbose'/],
    ];
    for (const [args, message] of cases) {
      const r = cli(args, cwd);
      expect({ args, code: r.code }).toEqual({ args, code: 2 });
      expect(r.stderr).toMatch(message);
    }
  });

  it('exits 1 when the device does not exist, and tells to run doctor', () => {
    const r = cli([...single(), '-o', 'dev', '--device', 'cuda:99'], cwd);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/cuda:99/);
    expect(r.stderr).toMatch(/doctor|pick one of them/);
    expect(fs.existsSync(path.join(cwd, 'dev', 'delta.safetensors'))).toBe(false);
  });

  it('Ctrl-C saves a checkpoint, exits 130, and --resume finishes the run with its recorded options', async () => {
    let sent = false;
    const r = await cliAsync([...single(), '--max-train-steps', '100000', '-o', 'sigint', '--json'], cwd, (line, child) => {
      if (!sent && JSON.parse(line).event === 'step') {
        sent = true;
        child.kill('SIGINT');
      }
    });
    expect(sent).toBe(true);
    expect(r.code).toBe(130);
    expect(r.stderr).toMatch(/Interrupted after step \d+; saved .*checkpoint-\d+\. Continue with: customdiff train -o sigint --resume/);
    const ev = events(r.stdout);
    const ck = ev.find((e) => e.event === 'checkpoint' && e.reason === 'abort');
    expect(ck).toBeDefined();
    const interrupted = ev.find((e) => e.event === 'interrupted')!;
    expect(interrupted.checkpoint).toBe(ck!.path);
    expect(ev.find((e) => e.event === 'error')).toMatchObject({ code: 'ABORT_ERR' });
    expect(fs.existsSync(path.join(ck!.path as string, 'state.json'))).toBe(true);
    expect(fs.existsSync(path.join(cwd, 'sigint', 'delta.safetensors'))).toBe(false);
    const step = interrupted.step as number;

    // Resume: only the output folder and a new step count; the rest comes from the checkpoint.
    const res = cli(['train', '-o', 'sigint', '--resume', '--max-train-steps', String(step + 2), '--json'], cwd);
    expect(res.stderr).toBe('');
    expect(res.code).toBe(0);
    const rev = events(res.stdout);
    expect(rev.find((e) => e.event === 'start')!.resumeFrom).toBe(ck!.path);
    expect(rev.filter((e) => e.event === 'step').map((e) => e.step)).toEqual([step + 1, step + 2]);
    expect(fs.existsSync(path.join(cwd, 'sigint', 'delta.safetensors'))).toBe(true);
  });
});

describe('customdiff inspect / compress / compose', () => {
  const single = () => path.join(cwd, 'plain', 'delta.safetensors');

  it('inspects a delta: metadata, tokens, layers, sizes (human and --json)', () => {
    const r = cli(['inspect', single(), '--json'], cwd);
    expect(r.code).toBe(0);
    const [res] = events(r.stdout);
    expect(res).toMatchObject({ event: 'result', format: 'custom-diffusion-delta', kind: 'full', freezeModel: 'crossattn_kv', dtype: 'float32' });
    expect((res.tokens as { token: string }[]).map((t) => t.token)).toEqual(['<new1>']);
    const layers = res.layers as { name: string; shape: number[]; bytes: number }[];
    expect(layers).toHaveLength(14);
    expect(layers.every((l) => /attn2\.to_[kv]\.weight$/.test(l.name) && l.bytes === 4 * l.shape[0] * l.shape[1])).toBe(true);
    const h = cli(['inspect', single()], cwd);
    expect(h.code).toBe(0);
    expect(h.stdout).toMatch(/^Kind\s+full/m);
    expect(h.stdout).toMatch(/^Tokens\s+<new1> \(id 1514, initialised from man<\/w>\)/m);
    expect(h.stdout).toMatch(/^Layers\s+14, [\d,]+ parameters/m);
    expect(h.stdout).toMatch(/^Training\s+2 steps/m);
    const missing = cli(['inspect', 'nope.safetensors'], cwd);
    expect(missing.code).toBe(1);
    expect(missing.stderr).toMatch(/Cannot read the delta nope\.safetensors .*check the path/);
  });

  it('compresses by --ratio and --rank; never overwrites without --overwrite', async () => {
    const r = cli(['compress', single(), '-m', MODEL, '--json'], cwd);
    expect(r.code).toBe(0);
    const res = events(r.stdout).pop()!;
    const out = path.join(cwd, 'plain', 'compressed_delta.safetensors');
    expect(res.output).toBe(out);
    expect(res.layers).toBe(14);
    expect(res.outputBytes as number).toBeLessThan(res.inputBytes as number);
    const i = events(cli(['inspect', out, '--json'], cwd).stdout)[0];
    expect(i.kind).toBe('compressed');
    expect((i.metadata as { compression: { ratio: number } }).compression.ratio).toBe(0.6);

    const again = cli(['compress', single(), '-m', MODEL], cwd);
    expect(again.code).toBe(2);
    expect(again.stderr).toMatch(/already exists; pass --overwrite/);

    const r2 = path.join(cwd, 'r2.safetensors');
    const k = cli(['compress', single(), '-m', MODEL, '--rank', '2', '--dtype', 'float16', '-o', r2], cwd);
    expect(k.code).toBe(0);
    const i2 = events(cli(['inspect', r2, '--json'], cwd).stdout)[0];
    expect((i2.layers as { rank: number }[]).every((l) => l.rank === 2)).toBe(true);
    expect(i2.dtype).toBe('float16');
    expect((await readSafetensorsHeader(r2)).entries.every((e) => /16/.test(e.dtype))).toBe(true);
    const before = mtime(r2);
    expect(cli(['compress', single(), '-m', MODEL, '--rank', '3', '-o', r2, '--overwrite'], cwd).code).toBe(0);
    expect(mtime(r2)).toBeGreaterThan(before);
  });

  it('composes two deltas into one with <new1>, <new2>', () => {
    // A second single-concept delta (no prior preservation).
    const t = cli(['train', ...FAST, '--instance-dir', dirs.inst2, '--instance-prompt', 'photo of a <new1> dog', '--max-train-steps', '1', '-o', 'dog', '--quiet'], cwd);
    expect(t.code).toBe(0);
    const out = path.join(cwd, 'merged.safetensors');
    const args = ['compose', '--delta', single(), '--delta', path.join(cwd, 'dog', 'delta.safetensors'), '--category', 'man', '--category', 'dog', '-m', MODEL, '-o', out];
    const r = cli([...args, '--json'], cwd);
    expect(r.code).toBe(0);
    const res = events(r.stdout).pop()!;
    expect((res.concepts as { token: string; category: string }[]).map((c) => [c.token, c.category])).toEqual([
      ['<new1>', 'man'],
      ['<new2>', 'dog'],
    ]);
    const i = events(cli(['inspect', out, '--json'], cwd).stdout)[0];
    expect(i.kind).toBe('merged');
    expect((i.tokens as { token: string; id: number }[]).map((x) => [x.token, x.id])).toEqual([
      ['<new1>', 1514],
      ['<new2>', 1515],
    ]);
    const again = cli(args, cwd);
    expect(again.code).toBe(2);
    expect(again.stderr).toMatch(/already exists; pass --overwrite/);
    expect(cli([...args, '--overwrite', '--max-captions', '50'], cwd).code).toBe(0);
  });
});
