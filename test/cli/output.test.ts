/** The Reporter (bars, plain lines, JSON events, verbosity) and the option helpers, without spawning. */
import { Command } from 'commander';
import { Writable } from 'stream';
import { Reporter, formatBytes, formatDuration, formatRate } from '../../src/cli/output';
import { addCommonOptions, applyOptionValues, collectArg, intArg, optionKey } from '../../src/cli/options';
import { promptTokens } from '../../src/cli/train';
import { InvalidArgumentError } from '../../src/errors';

class Sink extends Writable {
  text = '';
  isTTY: boolean;
  columns = 160;
  constructor(tty = false) {
    super();
    this.isTTY = tty;
  }
  override _write(chunk: Buffer | string, _enc: string, cb: () => void): void {
    this.text += chunk.toString();
    cb();
  }
  // What cli-progress calls on a terminal.
  cursorTo(): boolean {
    return true;
  }
  clearLine(): boolean {
    return true;
  }
  clearScreenDown(): boolean {
    return true;
  }
  moveCursor(): boolean {
    return true;
  }
}

function reporter(o: { json?: boolean; quiet?: boolean; verbose?: boolean; tty?: boolean } = {}) {
  const out = new Sink();
  const err = new Sink(!!o.tty);
  const r = new Reporter({ ...o, stdout: out, stderr: err as unknown as NodeJS.WriteStream, tty: o.tty });
  return { r, out, err };
}

describe('Reporter', () => {
  it('formats durations, rates and sizes', () => {
    expect(formatDuration(5.4)).toBe('5s');
    expect(formatDuration(185)).toBe('3m05s');
    expect(formatDuration(3720)).toBe('1h02m');
    expect(formatDuration(NaN)).toBe('--');
    expect(formatRate(3.214, 'step')).toBe('3.21 step/s');
    expect(formatRate(0.25, 'step')).toBe('4.00 s/step');
    expect(formatBytes(76_680_000)).toBe('76.7 MB');
    expect(formatBytes(512)).toBe('512 B');
  });

  it('draws a bar with loss, rate and ETA on a terminal', async () => {
    const { r, err, out } = reporter({ tty: true });
    const bar = r.progress({ label: 'train', total: 10, unit: 'step' });
    bar.update(4, { fields: { loss: '0.1234' }, rate: 2, etaSeconds: 3 });
    r.info('a note above the bar');
    bar.stop();
    r.close();
    expect(err.text).toMatch(/train \|[░█]+\| 4\/10 steps \| loss 0\.1234 \| 2\.00 step\/s \| ETA 3s \| \d+s/);
    expect(err.text).toMatch(/a note above the bar/);
    expect(out.text).toBe('');
  });

  it('prints plain lines at a steady pace when not a terminal (every update with --verbose)', () => {
    const { r, err } = reporter();
    const bar = r.progress({ label: 'train', total: 100, unit: 'step' });
    for (let i = 1; i <= 100; i++) bar.update(i, { fields: { loss: '1.0000' } });
    const lines = err.text.trim().split('\n');
    expect(lines.map((l) => Number(/step (\d+)\/100/.exec(l)![1]))).toEqual([1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]);
    expect(lines[0]).toMatch(/^train: step 1\/100 \| loss 1\.0000 \| .* \| ETA \S+ \| elapsed \S+$/);
    expect(lines[10]).not.toMatch(/ETA/);
    const v = reporter({ verbose: true });
    const b2 = v.r.progress({ label: 'x', total: 30 });
    for (let i = 1; i <= 30; i++) b2.update(i);
    expect(v.err.text.trim().split('\n')).toHaveLength(30);
  });

  it('--json: one event per line on stdout, nothing on stderr; --quiet keeps warnings and results', () => {
    const { r, out, err } = reporter({ json: true });
    r.info('hello');
    r.warn('careful');
    r.progress({ label: 'compose', total: 2 }).update(1);
    r.progress({ label: 'train', total: 2, jsonEvents: false }).update(1);
    r.event('step', { step: 1 });
    r.result('ignored text', { ok: true });
    r.error(new InvalidArgumentError('bad'));
    expect(err.text).toBe('');
    expect(out.text.trim().split('\n').map((l) => JSON.parse(l))).toEqual([
      { event: 'info', message: 'hello' },
      { event: 'warning', message: 'careful' },
      { event: 'progress', task: 'compose', value: 1, total: 2 },
      { event: 'step', step: 1 },
      { event: 'result', ok: true },
      { event: 'error', code: 'INVALID_ARGUMENT', message: 'bad' },
    ]);
    const q = reporter({ json: true, quiet: true });
    q.r.info('hidden');
    q.r.event('step', { step: 1 });
    q.r.warn('shown');
    q.r.result(undefined, { ok: 1 });
    expect(q.out.text.trim().split('\n').map((l) => JSON.parse(l).event)).toEqual(['warning', 'result']);
    const h = reporter({ quiet: true });
    h.r.info('hidden');
    h.r.progress({ label: 'x', total: 1 }).update(1);
    h.r.warn('shown');
    h.r.result('the result', {});
    expect(h.err.text).toBe('warning: shown\n');
    expect(h.out.text).toBe('the result\n');
  });
});

describe('option helpers', () => {
  it('normalises config keys and applies values through the option parsers', () => {
    expect(optionKey('max-train-steps')).toBe('maxTrainSteps');
    expect(optionKey('max_train_steps')).toBe('maxTrainSteps');
    expect(optionKey('--adam-beta1')).toBe('adamBeta1');
    const cmd = new Command('t')
      .option('--steps <n>', '', intArg(1))
      .option('--delta <f>', '', collectArg)
      .option('--no-hflip', '')
      .option('--name <s>', '');
    addCommonOptions(cmd);
    cmd.parse(['--name', 'cli'], { from: 'user' });
    applyOptionValues(cmd, { steps: 3, delta: ['a', 'b'], 'no-hflip': true, name: 'file' }, 'config', 'f.json');
    expect(cmd.opts()).toMatchObject({ steps: 3, delta: ['a', 'b'], hflip: false, name: 'cli' });
    expect(cmd.getOptionValueSource('steps')).toBe('config');
    applyOptionValues(cmd, { steps: 9, name: 'p' }, 'preset', 'preset', { onlyUnset: true });
    expect(cmd.opts().steps).toBe(3);
    expect(() => applyOptionValues(cmd, { steps: 0 }, 'config', 'f.json')).toThrow(/f\.json: --steps <n> value 0 is invalid: expected an integer ≥ 1/);
    expect(() => applyOptionValues(cmd, { hflip: 'yes' }, 'config', 'f.json')).toThrow(/switch; give true or false/);
    expect(() => applyOptionValues(cmd, { nope: 1 }, 'config', 'f.json')).toThrow(InvalidArgumentError);
  });

  it('finds modifier tokens in prompts', () => {
    expect(promptTokens(['photo of a <new1> cat', '<new2> pot and <new1>'])).toEqual(['<new1>', '<new2>']);
    expect(promptTokens(['a cat'])).toEqual([]);
  });
});
