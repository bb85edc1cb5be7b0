/**
 * The loader and typed declarations of the native addon. Nothing else in the library touches the
 * binding directly: every call goes through {@link native} and every native error through
 * {@link mapNativeError}.
 */
import * as path from 'path';
import {
  AbortError,
  CustomDiffusionError,
  DeviceUnavailableError,
  FileError,
  InvalidArgumentError,
  ModelError,
  NativeError,
  NativeLoadError,
  OutOfMemoryError,
  PickleError,
  SafetensorsError,
  DisposedError,
  TrainingError,
} from './errors';

/** Element types a tensor can hold. */
export type Dtype = 'float32' | 'float16' | 'bfloat16' | 'float64' | 'int64' | 'int32' | 'int16' | 'int8' | 'uint8' | 'bool';

/** `cpu`, `cuda` or `cuda:N`. */
export type DeviceName = string;

/** A progress event sent by native work. */
export interface NativeProgress {
  kind: string;
  /** A binary payload, when the event carries one (e.g. a preview image). */
  data?: Buffer;
  [key: string]: number | string | Buffer | undefined;
}

export interface NativeTensor {
  readonly shape: number[];
  readonly dtype: Dtype;
  readonly device: string;
  readonly numel: number;
  readonly disposed: boolean;
  dispose(): void;
  toArray(): Float32Array | Float64Array | Uint16Array | Int32Array | Int16Array | Int8Array | Uint8Array | BigInt64Array;
  item(): number | boolean;
  to(options: { dtype?: Dtype; device?: DeviceName }): Promise<NativeTensor>;
}

export interface NativeTensorStatic {
  fromArray(data: ArrayBufferView, shape: number[], dtype?: Dtype): NativeTensor;
  zeros(shape: number[], options?: { dtype?: Dtype; device?: DeviceName }): NativeTensor;
  randn(shape: number[], options?: { dtype?: Dtype; device?: DeviceName; generator?: NativeGenerator }): NativeTensor;
}

export interface NativeGenerator {
  readonly seed: bigint;
  readonly device: string;
  getState(): Uint8Array;
  setState(state: Uint8Array): void;
}

export interface NativeCancelToken {
  cancel(): void;
  readonly cancelled: boolean;
}

export interface SafetensorsEntry {
  name: string;
  dtype: string;
  shape: number[];
  dataOffsets: [number, number];
}

export interface NativeInfo {
  torchVersion: string;
  /** The LibTorch identity the addon was compiled against. */
  libtorchIdentity: string;
  builtWithCuda: boolean;
  cudaAvailable: boolean;
  cudnnAvailable: boolean;
  cudaDeviceCount: number;
  cudaDevices: { index: number; name: string; totalMemory: number; computeCapability: string }[];
  cudaDriverVersion?: string;
  mkldnnAvailable: boolean;
  numThreads: number;
  numInteropThreads: number;
  parallelInfo: string;
  /** OMP_WAIT_POLICY as OpenMP read it when the addon loaded (null: not set). */
  ompWaitPolicy: string | null;
  /** GOMP_SPINCOUNT as OpenMP read it when the addon loaded (null: not set). */
  gompSpinCount: string | null;
  liveTensors: number;
}

/** The raw binding, as the C++ side registers it (native/addon.cc). */
export interface NativeBinding {
  Tensor: NativeTensorStatic & (new (...args: never[]) => NativeTensor);
  Generator: new (seed: number | bigint, device?: DeviceName) => NativeGenerator;
  CancelToken: new () => NativeCancelToken;
  safetensorsReadHeader(
    file: string,
  ): Promise<{ entries: SafetensorsEntry[]; metadata: Record<string, string>; headerSize: number; dataSize: number }>;
  safetensorsLoad(
    file: string,
    options?: { dtype?: Dtype; device?: DeviceName; names?: string[] },
  ): Promise<{ tensors: Record<string, NativeTensor>; metadata: Record<string, string> }>;
  safetensorsSave(file: string, names: string[], tensors: NativeTensor[], metadata: Record<string, string>): Promise<void>;
  info(): NativeInfo;
  setNumThreads(n: number): void;
  getNumThreads(): number;
  liveTensors(): number;
  selftest: {
    throwInWorker(kind: string): Promise<never>;
    workerNumThreads(): Promise<number>;
    countdown(
      steps: number,
      msPerStep: number,
      onProgress?: (p: NativeProgress) => void,
      token?: NativeCancelToken,
    ): Promise<number>;
  };
}

/** What LibTorch was found and which addon file was loaded. */
export interface LoadedAddon {
  binding: NativeBinding;
  file: string;
  libtorch: LibTorchInfo;
}

export interface LibTorchInfo {
  root: string;
  source: string;
  version: string;
  cuda: boolean;
  cxx11Abi: number;
  identity: string;
}

interface AddonHelpers {
  select(libtorch: LibTorchInfo): { file: string | null; rejected: string[] };
}
interface FinderHelpers {
  findLibTorch(): LibTorchInfo;
}

const packageRoot = path.resolve(__dirname, '..');
let loaded: LoadedAddon | undefined;

/** Loads the addon once (finding LibTorch and checking the addon was built for it). */
export function loadAddon(): LoadedAddon {
  if (loaded) return loaded;
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const finder = require(path.join(packageRoot, 'scripts', 'find-libtorch.js')) as FinderHelpers;
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const addon = require(path.join(packageRoot, 'scripts', 'addon.js')) as AddonHelpers;
  let libtorch: LibTorchInfo;
  try {
    libtorch = finder.findLibTorch();
  } catch (e) {
    throw new NativeLoadError((e as Error).message, { cause: e });
  }
  const { file, rejected } = addon.select(libtorch);
  if (!file) {
    const why = rejected.length ? `\nRefused:\n  ${rejected.join('\n  ')}` : '';
    throw new NativeLoadError(
      `No native addon of custom-diffusion fits LibTorch ${libtorch.identity} (${libtorch.root}).${why}\n` +
        'Build one for it with `npm rebuild custom-diffusion` (or `npm run build:native` in a checkout).',
    );
  }
  let binding: NativeBinding;
  // LibTorch's OpenMP (libgomp) reads OMP_WAIT_POLICY and GOMP_SPINCOUNT once, as it loads with the
  // addon. Our work runs on libuv's worker threads and on the JS thread, each of which gets its own
  // OpenMP team, so libgomp counts more threads than cores and by default puts its workers to sleep
  // after every parallel region; waking them costs more than a small operation takes (the tiny test
  // model's guided denoising step at 2 threads: 31 ms, against 5.6 ms at 1 thread). ACTIVE lets them
  // wait spinning; the spin count (libgomp's own default for ACTIVE is near-endless) is bounded so a
  // team that is done stops spinning before it slows the next one down (unbounded, the toy
  // autoencoder's training step took 652 ms instead of 300-350). Set for the load only, so processes
  // started later do not inherit them, and only when the user has set neither.
  const userChose = process.env.OMP_WAIT_POLICY !== undefined || process.env.GOMP_SPINCOUNT !== undefined;
  if (!userChose) {
    process.env.OMP_WAIT_POLICY = 'ACTIVE';
    process.env.GOMP_SPINCOUNT = '300000';
  }
  try {
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    binding = require(file) as NativeBinding;
  } catch (e) {
    throw new NativeLoadError(
      `The native addon ${file} could not be loaded: ${(e as Error).message}\n` +
        'Rebuild it for this machine with `npm rebuild custom-diffusion`.',
      { cause: e },
    );
  } finally {
    if (!userChose) {
      delete process.env.OMP_WAIT_POLICY;
      delete process.env.GOMP_SPINCOUNT;
    }
  }
  // The sidecar said this addon fits; the identity compiled into it must say the same (a copied or
  // renamed file would otherwise run against a LibTorch it was not built for).
  const built = binding.info().libtorchIdentity;
  if (built !== libtorch.identity) {
    throw new NativeLoadError(
      `The native addon ${file} was compiled against ${built}, but the LibTorch here is ${libtorch.identity} ` +
        `(${libtorch.root}). Rebuild it with \`npm rebuild custom-diffusion\`.`,
    );
  }
  loaded = { binding, file, libtorch };
  return loaded;
}

/** The binding (loaded on first use). */
export function native(): NativeBinding {
  return loadAddon().binding;
}

/** Turns an error from the binding into the matching typed error. */
export function mapNativeError(e: unknown): Error {
  if (e instanceof CustomDiffusionError) return e;
  // Checked by shape, not instanceof: native errors belong to the main realm's Error, which differs
  // from the Error of a vm context (jest, REPL contexts).
  if (typeof e !== 'object' || e === null || typeof (e as { message?: unknown }).message !== 'string') {
    return new NativeError(String(e));
  }
  const err = e as Error & { code?: string; file?: string; tensor?: string; global?: string; offset?: string; step?: string };
  switch (err.code) {
    case 'SAFETENSORS_FORMAT':
      return new SafetensorsError(err.message, err.file ?? '', err.tensor, { cause: e });
    case 'FILE':
      return new FileError(err.message, err.file ?? '', { cause: e });
    case 'INVALID_ARGUMENT':
      return new InvalidArgumentError(err.message, { cause: e });
    case 'DEVICE_UNAVAILABLE':
      return new DeviceUnavailableError(err.message, { cause: e });
    case 'ABORT_ERR':
      return new AbortError(err.message, { cause: e });
    case 'OUT_OF_MEMORY':
      return new OutOfMemoryError(err.message, { cause: e });
    case 'DISPOSED':
      return new DisposedError(err.message);
    case 'MODEL_CONFIG':
    case 'MODEL_WEIGHTS':
      return new ModelError(err.message, err.code, err.file ?? '', { cause: e });
    case 'PICKLE_FORMAT':
    case 'PICKLE_UNSAFE':
      return new PickleError(
        err.message,
        err.code,
        err.file ?? '',
        { global: err.global, offset: err.offset === undefined ? undefined : Number(err.offset) },
        { cause: e },
      );
    case 'TRAIN_NAN':
    case 'TRAIN_STATE':
      return new TrainingError(err.message, err.code, err.step === undefined ? undefined : Number(err.step), { cause: e });
    default:
      if (err.name === 'TypeError') return new InvalidArgumentError(err.message, { cause: e });
      return new NativeError(err.message, err.code ?? 'NATIVE', { cause: e });
  }
}

/** Calls a synchronous binding function, mapping its errors. */
export function callSync<T>(fn: () => T): T {
  try {
    return fn();
  } catch (e) {
    throw mapNativeError(e);
  }
}

/** Awaits a binding promise, mapping its rejection. */
export async function callAsync<T>(fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (e) {
    throw mapNativeError(e);
  }
}

/**
 * Runs cancellable native work: the AbortSignal is tied to a native CancelToken that the worker
 * polls between units of work.
 */
export async function callCancellable<T>(
  signal: AbortSignal | undefined,
  fn: (token: NativeCancelToken) => Promise<T>,
): Promise<T> {
  if (signal?.aborted) throw new AbortError(abortMessage(signal));
  const token = new (native().CancelToken)();
  const onAbort = () => token.cancel();
  signal?.addEventListener('abort', onAbort, { once: true });
  try {
    return await fn(token);
  } catch (e) {
    const mapped = mapNativeError(e);
    if (mapped instanceof AbortError && signal?.aborted) throw new AbortError(abortMessage(signal), { cause: e });
    throw mapped;
  } finally {
    signal?.removeEventListener('abort', onAbort);
  }
}

function abortMessage(signal: AbortSignal): string {
  const r: unknown = signal.reason;
  if (r instanceof Error && r.name !== 'AbortError') return `The operation was aborted: ${r.message}`;
  if (typeof r === 'string') return `The operation was aborted: ${r}`;
  return 'The operation was aborted.';
}

/**
 * The binding seen through the interface an area declares for its own functions (each model part
 * declares what its native file registers, next to the TypeScript that uses it).
 */
export function nativeAs<T>(): T {
  return native() as unknown as T;
}

/**
 * The native handle of a loaded model (UNet, TextEncoder, AutoencoderKL keep it private to the
 * library; the trainer and the sampler hand it to native code that works on the model itself).
 */
export function modelHandle(model: object, what: string): unknown {
  const h = (model as { handle?: unknown }).handle;
  if (h === undefined || h === null) throw new InvalidArgumentError(`${what} is not a loaded model`);
  return h;
}
