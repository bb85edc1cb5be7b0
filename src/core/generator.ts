import { callSync, native, type DeviceName, type NativeGenerator } from '../native';

/**
 * A seeded random number generator. The same seed gives the same numbers on the same device and
 * LibTorch; {@link Generator.getState} and {@link Generator.setState} save and restore its position
 * exactly (for checkpoints).
 */
export class Generator {
  /** @internal */
  readonly handle: NativeGenerator;

  constructor(seed: number | bigint, device: DeviceName = 'cpu') {
    this.handle = callSync(() => new (native().Generator)(seed, device));
  }

  get seed(): bigint {
    return this.handle.seed;
  }

  get device(): string {
    return this.handle.device;
  }

  getState(): Uint8Array {
    return callSync(() => this.handle.getState());
  }

  setState(state: Uint8Array): void {
    callSync(() => this.handle.setState(state));
  }
}
