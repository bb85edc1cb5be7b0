import { callSync, loadAddon, native, type NativeInfo } from '../native';

/** What this installation can use: LibTorch, the addon file, CUDA devices, threads. */
export interface RuntimeInfo extends NativeInfo {
  /** The addon file that was loaded. */
  addonFile: string;
  /** The LibTorch the addon runs against, and how it was found. */
  libtorch: { root: string; source: string; version: string; cuda: boolean; identity: string };
}

/** Describes the native runtime (loads the addon on first call). */
export function info(): RuntimeInfo {
  const { file, libtorch } = loadAddon();
  const n = callSync(() => native().info());
  return {
    ...n,
    addonFile: file,
    libtorch: {
      root: libtorch.root,
      source: libtorch.source,
      version: libtorch.version,
      cuda: libtorch.cuda,
      identity: libtorch.identity,
    },
  };
}

/** Sets the number of threads LibTorch uses for one operation (intra-op parallelism). */
export function setNumThreads(n: number): void {
  callSync(() => native().setNumThreads(n));
}

export function getNumThreads(): number {
  return callSync(() => native().getNumThreads());
}

/** How many native tensor handles are alive (not yet disposed or collected). */
export function liveTensors(): number {
  return callSync(() => native().liveTensors());
}
