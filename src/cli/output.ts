/**
 * What the CLI prints, in one place: a {@link Reporter} per command run.
 *
 * - Human mode (the default): the command's result on stdout; progress, notes and warnings on
 *   stderr. On a terminal, progress is a cli-progress bar redrawn in place (with loss, it/s and ETA
 *   for training); when stderr is not a terminal (a log file, CI), plain lines at a steady pace.
 * - `--json`: stdout carries only JSON, one event object per line (`{"event": "step", …}`), so a
 *   program can read it line by line; human messages still go to stderr only for errors.
 * - `--quiet`: no progress and no notes (warnings and errors are still shown; the result still
 *   printed). `--verbose`: every training step and debug notes as well.
 *
 * @packageDocumentation
 */
import { MultiBar, Presets, type SingleBar } from 'cli-progress';
import { CustomDiffusionError } from '../errors';

export type Verbosity = 'quiet' | 'normal' | 'verbose';

export interface ReporterOptions {
  json?: boolean;
  quiet?: boolean;
  verbose?: boolean;
  /** Where human progress and notes go (default process.stderr). */
  stderr?: NodeJS.WriteStream | NodeJS.WritableStream;
  /** Where results and JSON events go (default process.stdout). */
  stdout?: NodeJS.WritableStream;
  /** Draw bars (default: whether `stderr` is a TTY). */
  tty?: boolean;
  /** The command's name, used in plain progress lines and messages. */
  command?: string;
}

/** Seconds as `12s`, `3m05s`, `1h02m`. */
export function formatDuration(seconds: number): string {
  if (!Number.isFinite(seconds) || seconds < 0) return '--';
  const s = Math.round(seconds);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, '0')}s`;
  return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, '0')}m`;
}

/** A rate as `3.21 it/s`, or `4.52 s/it` when slower than one per second (as tqdm prints it). */
export function formatRate(perSecond: number, unit = 'it'): string {
  if (!Number.isFinite(perSecond) || perSecond <= 0) return `-- ${unit}/s`;
  if (perSecond >= 1) return `${perSecond.toFixed(2)} ${unit}/s`;
  return `${(1 / perSecond).toFixed(2)} s/${unit}`;
}

/** Bytes as `76.7 MB` (SI units, as file managers show them). */
export function formatBytes(bytes: number): string {
  if (bytes < 1000) return `${bytes} B`;
  const units = ['kB', 'MB', 'GB', 'TB'];
  let v = bytes;
  let i = -1;
  while (v >= 1000 && i < units.length - 1) {
    v /= 1000;
    i++;
  }
  return `${v.toFixed(v >= 100 ? 0 : 1)} ${units[i]}`;
}

export interface ProgressSpec {
  /** Shown before the bar and in plain lines, e.g. `train`, `compose: merge`. */
  label: string;
  total: number;
  /** What one unit is (`step`, `image`, `layer`); rates show `<unit>/s`. Default `it`. */
  unit?: string;
  /** Start value (resumed runs). */
  start?: number;
  /** In `--json` mode, emit a `progress` event per update (default true; false when the command emits its own events). */
  jsonEvents?: boolean;
}

export interface ProgressUpdate {
  /** Short extra fields shown in the bar and the plain lines, e.g. `{ loss: '0.1234' }`. */
  fields?: Record<string, string>;
  /** Units per second, when the caller knows better than the elapsed average (training's recent mean). */
  rate?: number;
  /** Seconds left, when the caller knows better. */
  etaSeconds?: number;
  /** Extra data for the JSON `progress` event. */
  data?: Record<string, unknown>;
}

/** One progress display; updates are cheap (bars redraw at most 10 times a second). */
export interface Progress {
  update(value: number, update?: ProgressUpdate): void;
  /** Removes the bar (leaving its last state on screen) and prints nothing more for it. */
  stop(): void;
}

const NO_PROGRESS: Progress = { update: () => undefined, stop: () => undefined };

function fieldsText(fields: Record<string, string> | undefined): string {
  if (!fields) return '';
  return Object.entries(fields)
    .map(([k, v]) => `${k} ${v}`)
    .join(' | ');
}

/** Prints a command's progress, notes, events and result according to --json/--quiet/--verbose and the terminal. */
export class Reporter {
  readonly json: boolean;
  readonly verbosity: Verbosity;
  readonly tty: boolean;
  readonly command: string;
  private readonly out: NodeJS.WritableStream;
  private readonly err: NodeJS.WritableStream;
  private multi: MultiBar | undefined;
  private bars = 0;

  constructor(o: ReporterOptions = {}) {
    this.json = !!o.json;
    this.verbosity = o.quiet ? 'quiet' : o.verbose ? 'verbose' : 'normal';
    this.out = o.stdout ?? process.stdout;
    this.err = o.stderr ?? process.stderr;
    this.tty = o.tty ?? !!(this.err as NodeJS.WriteStream).isTTY;
    this.command = o.command ?? 'customdiff';
  }

  get quiet(): boolean {
    return this.verbosity === 'quiet';
  }

  get verbose(): boolean {
    return this.verbosity === 'verbose';
  }

  /** A JSON event on stdout (only in --json mode; `important` events are kept under --quiet). */
  event(name: string, data: Record<string, unknown> = {}, important = false): void {
    if (!this.json || (this.quiet && !important)) return;
    this.out.write(JSON.stringify({ event: name, ...data }) + '\n');
  }

  /** A note for people (stderr); in --json mode an `info` event. Hidden by --quiet. */
  info(message: string, data: Record<string, unknown> = {}): void {
    if (this.quiet) return;
    if (this.json) this.event('info', { message, ...data });
    else this.line(message);
  }

  /** A note shown only with --verbose. */
  debug(message: string, data: Record<string, unknown> = {}): void {
    if (!this.verbose) return;
    if (this.json) this.event('debug', { message, ...data });
    else this.line(message);
  }

  /** A warning: always shown (stderr, or a `warning` event). */
  warn(message: string, data: Record<string, unknown> = {}): void {
    if (this.json) this.event('warning', { message, ...data }, true);
    else this.line(`warning: ${message}`);
  }

  /**
   * The command's result: `text` on stdout for people (always, even with --quiet), or one `result`
   * event with `data` in --json mode.
   */
  result(text: string | undefined, data: Record<string, unknown>): void {
    if (this.json) this.event('result', data, true);
    else if (text !== undefined) this.out.write(text.endsWith('\n') ? text : text + '\n');
  }

  /** An `error` event in --json mode (the message itself goes to stderr from main()). */
  error(e: unknown): void {
    if (!this.json) return;
    const message = e instanceof Error ? e.message : String(e);
    const code = e instanceof CustomDiffusionError ? e.code : e instanceof Error && 'code' in e ? String((e as { code: unknown }).code) : 'ERROR';
    this.event('error', { code, message }, true);
  }

  /** A line on stderr, printed above any bar. */
  private line(text: string): void {
    if (this.multi) this.multi.log(text + '\n');
    else this.err.write(text + '\n');
  }

  /** Starts a progress display (a bar on a terminal, plain lines otherwise, events with --json, nothing with --quiet). */
  progress(spec: ProgressSpec): Progress {
    if (this.quiet) return NO_PROGRESS;
    if (this.json) return spec.jsonEvents === false ? NO_PROGRESS : this.jsonProgress(spec);
    return this.tty ? this.barProgress(spec) : this.plainProgress(spec);
  }

  /** Stops every bar (restores the cursor); call before exiting. */
  close(): void {
    if (this.multi) {
      // stop() does not print lines logged since the last redraw: redraw once first.
      this.multi.update();
      this.multi.stop();
      this.multi = undefined;
      this.bars = 0;
    }
  }

  private jsonProgress(spec: ProgressSpec): Progress {
    return {
      update: (value, u = {}) => this.event('progress', { task: spec.label, value, total: spec.total, ...(u.data ?? {}) }),
      stop: () => undefined,
    };
  }

  private timing(spec: ProgressSpec) {
    const t0 = performance.now();
    const start = spec.start ?? 0;
    return (value: number, u: ProgressUpdate) => {
      const elapsed = (performance.now() - t0) / 1000;
      const rate = u.rate ?? (value > start && elapsed > 0 ? (value - start) / elapsed : NaN);
      const eta = u.etaSeconds ?? (rate > 0 ? (spec.total - value) / rate : NaN);
      return { elapsed, rate, eta };
    };
  }

  private barProgress(spec: ProgressSpec): Progress {
    if (!this.multi) {
      this.multi = new MultiBar(
        {
          stream: this.err,
          // Payload names must not clash with cli-progress's own placeholders (eta, duration, value, …).
          format: '{label} |{bar}| {value}/{total} {unit}{fields} | {rate} | ETA {etaText} | {elapsedText}',
          hideCursor: true,
          clearOnComplete: false,
          stopOnComplete: false,
          barsize: 24,
          fps: 10,
          emptyOnZero: true,
          autopadding: true,
        },
        Presets.shades_classic,
      );
    }
    const multi = this.multi;
    const unit = spec.unit ?? 'it';
    const timing = this.timing(spec);
    let bar: SingleBar | undefined = multi.create(Math.max(spec.total, 1), spec.start ?? 0, {
      label: spec.label,
      unit: `${unit}s`,
      fields: '',
      rate: formatRate(NaN, unit),
      etaText: '--',
      elapsedText: '0s',
    });
    this.bars += 1;
    return {
      update: (value, u = {}) => {
        if (!bar) return;
        const t = timing(value, u);
        const f = fieldsText(u.fields);
        bar.update(value, {
          label: spec.label,
          unit: `${unit}s`,
          fields: f ? ` | ${f}` : '',
          rate: formatRate(t.rate, unit),
          etaText: formatDuration(t.eta),
          elapsedText: formatDuration(t.elapsed),
        });
      },
      stop: () => {
        if (!bar) return;
        bar.stop();
        bar = undefined;
        this.bars -= 1;
        if (this.bars === 0) this.close();
      },
    };
  }

  private plainProgress(spec: ProgressSpec): Progress {
    const unit = spec.unit ?? 'it';
    const timing = this.timing(spec);
    // Deterministic cadence: the first and last update, every tenth of the run (every update with
    // --verbose), and at least every 30 seconds.
    const every = this.verbose ? 1 : Math.max(1, Math.ceil(spec.total / 10));
    let lastAt = performance.now();
    let lastValue = -1;
    let stopped = false;
    return {
      update: (value, u = {}) => {
        if (stopped || value === lastValue) return;
        const now = performance.now();
        const first = lastValue < 0;
        if (!(first || value >= spec.total || value % every === 0 || now - lastAt >= 30_000)) return;
        lastAt = now;
        lastValue = value;
        const t = timing(value, u);
        const parts = [`${spec.label}: ${unit} ${value}/${spec.total}`];
        const f = fieldsText(u.fields);
        if (f) parts.push(f);
        parts.push(formatRate(t.rate, unit));
        if (value < spec.total) parts.push(`ETA ${formatDuration(t.eta)}`);
        parts.push(`elapsed ${formatDuration(t.elapsed)}`);
        this.line(parts.join(' | '));
      },
      stop: () => {
        stopped = true;
      },
    };
  }
}
