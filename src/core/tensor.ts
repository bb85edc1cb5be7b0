import { callAsync, callSync, native, type DeviceName, type Dtype, type NativeTensor } from '../native';
import { InvalidArgumentError } from '../errors';
import type { Generator } from './generator';

/** The typed array a tensor of each dtype is copied into by {@link Tensor.toArray}. */
export type TensorData = Float32Array | Float64Array | Uint16Array | Int32Array | Int16Array | Int8Array | Uint8Array | BigInt64Array;

/**
 * A handle to a LibTorch tensor (host or device memory). Free it with {@link Tensor.dispose} when
 * done; a handle that is only dropped is freed by the garbage collector later.
 */
export class Tensor {
  /** @internal */
  readonly handle: NativeTensor;

  /** @internal */
  constructor(handle: NativeTensor) {
    this.handle = handle;
  }

  /**
   * Copies a typed array into a new CPU tensor. The dtype defaults to the array's own type;
   * float16/bfloat16 data is passed as raw bits in a Uint16Array with `dtype` given. A Float32Array
   * with `dtype: 'float16'` is converted.
   */
  static fromArray(data: ArrayBufferView, shape: number[], dtype?: Dtype): Tensor {
    return new Tensor(callSync(() => native().Tensor.fromArray(data, shape, dtype)));
  }

  /** A tensor of zeros. */
  static zeros(shape: number[], options: { dtype?: Dtype; device?: DeviceName } = {}): Tensor {
    return new Tensor(callSync(() => native().Tensor.zeros(shape, options)));
  }

  /** Standard normal samples; reproducible when a {@link Generator} is given. */
  static randn(shape: number[], options: { dtype?: Dtype; device?: DeviceName; generator?: Generator } = {}): Tensor {
    const { generator, ...rest } = options;
    return new Tensor(callSync(() => native().Tensor.randn(shape, { ...rest, generator: generator?.handle })));
  }

  get shape(): number[] {
    return callSync(() => this.handle.shape);
  }

  get dtype(): Dtype {
    return callSync(() => this.handle.dtype);
  }

  get device(): string {
    return callSync(() => this.handle.device);
  }

  get numel(): number {
    return callSync(() => this.handle.numel);
  }

  get disposed(): boolean {
    return this.handle.disposed;
  }

  /** Frees the tensor's memory now. Using the tensor afterwards throws a DisposedError. */
  dispose(): void {
    this.handle.dispose();
  }

  /** A copy of the data (float16/bfloat16 as raw bits in a Uint16Array; int64 as BigInt64Array). */
  toArray(): TensorData {
    return callSync(() => this.handle.toArray());
  }

  /** The value of a one-element tensor. */
  item(): number {
    const v = callSync(() => this.handle.item());
    if (typeof v !== 'number') throw new InvalidArgumentError('item() of a bool tensor: use toArray()');
    return v;
  }

  /** A converted copy on another dtype and/or device, made off the JS thread. */
  async to(options: { dtype?: Dtype; device?: DeviceName }): Promise<Tensor> {
    return new Tensor(await callAsync(() => this.handle.to(options)));
  }
}
