import * as vm from 'vm';
import * as v8 from 'v8';
import { DeviceUnavailableError, DisposedError, Generator, InvalidArgumentError, Tensor, getNumThreads, info, liveTensors, setNumThreads } from '../../src';

describe('Tensor', () => {
  it('copies typed arrays in and out with shape and dtype', () => {
    const t = Tensor.fromArray(new Float32Array([1, 2, 3, 4, 5, 6]), [2, 3]);
    expect(t.shape).toEqual([2, 3]);
    expect(t.dtype).toBe('float32');
    expect(t.device).toBe('cpu');
    expect(t.numel).toBe(6);
    expect(Array.from(t.toArray() as Float32Array)).toEqual([1, 2, 3, 4, 5, 6]);
    t.dispose();
  });

  it.each([
    [new Float64Array([1.5, -2]), 'float64'],
    [new Int32Array([1, -2]), 'int32'],
    [new Int16Array([1, -2]), 'int16'],
    [new Int8Array([1, -2]), 'int8'],
    [new Uint8Array([1, 2]), 'uint8'],
    [new BigInt64Array([1n, -2n]), 'int64'],
  ] as const)('keeps the natural dtype of %p', (arr, dtype) => {
    const t = Tensor.fromArray(arr, [2]);
    expect(t.dtype).toBe(dtype);
    // Compared as plain arrays: typed arrays from the addon belong to another realm than jest's.
    expect(Array.from(t.toArray() as Iterable<unknown>)).toEqual(Array.from(arr as Iterable<unknown>));
  });

  it('converts to float16 and bfloat16 with the exact bit patterns', async () => {
    const t = Tensor.fromArray(new Float32Array([1, -2, 0.5]), [3]);
    const h = await t.to({ dtype: 'float16' });
    expect(Array.from(h.toArray() as Uint16Array)).toEqual([0x3c00, 0xc000, 0x3800]);
    const b = await t.to({ dtype: 'bfloat16' });
    expect(Array.from(b.toArray() as Uint16Array)).toEqual([0x3f80, 0xc000, 0x3f00]);
    const back = Tensor.fromArray(h.toArray(), [3], 'float16');
    expect(back.dtype).toBe('float16');
    const f = await back.to({ dtype: 'float32' });
    expect(Array.from(f.toArray() as Float32Array)).toEqual([1, -2, 0.5]);
  });

  it('stores bool tensors as 0/1 bytes', () => {
    const t = Tensor.fromArray(new Uint8Array([1, 0, 1]), [3], 'bool');
    expect(t.dtype).toBe('bool');
    expect(Array.from(t.toArray() as Uint8Array)).toEqual([1, 0, 1]);
  });

  it('reads a scalar with item()', () => {
    expect(Tensor.fromArray(new Float32Array([2.5]), []).item()).toBe(2.5);
    expect(() => Tensor.fromArray(new Float32Array([1, 2]), [2]).item()).toThrow(InvalidArgumentError);
  });

  it('rejects bad shapes and raw 16-bit data without a dtype', () => {
    expect(() => Tensor.fromArray(new Float32Array(6), [4, 2])).toThrow(/shape holds 8 elements but the array has 6/);
    expect(() => Tensor.fromArray(new Float32Array(6), [-1, 6])).toThrow(InvalidArgumentError);
    expect(() => Tensor.fromArray(new Uint16Array(2), [2])).toThrow(/raw float16 or bfloat16 bits/);
    expect(() => Tensor.zeros([2], { dtype: 'float8' as never })).toThrow(/Unknown dtype "float8"/);
  });

  it('throws DisposedError after dispose()', () => {
    const t = Tensor.zeros([2, 2]);
    t.dispose();
    expect(t.disposed).toBe(true);
    expect(() => t.shape).toThrow(DisposedError);
    expect(() => t.toArray()).toThrow(DisposedError);
    t.dispose(); // twice is harmless
  });

  it('draws reproducible normals from a seeded Generator and restores its state', () => {
    const a = Tensor.randn([16], { generator: new Generator(42) }).toArray();
    const b = Tensor.randn([16], { generator: new Generator(42) }).toArray();
    expect(b).toEqual(a);
    const g = new Generator(7);
    Tensor.randn([5], { generator: g });
    const state = g.getState();
    const first = Tensor.randn([8], { generator: g }).toArray();
    g.setState(state);
    expect(Tensor.randn([8], { generator: g }).toArray()).toEqual(first);
    expect(g.seed).toBe(7n);
    expect(() => g.setState(new Uint8Array(3))).toThrow(InvalidArgumentError);
    expect(() => new Generator(-1)).toThrow(InvalidArgumentError);
  });

  it('refuses a CUDA device where none is usable, and uses it where it is', async () => {
    const t = Tensor.zeros([2]);
    if (!info().cudaAvailable) {
      await expect(t.to({ device: 'cuda' })).rejects.toBeInstanceOf(DeviceUnavailableError);
      expect(() => Tensor.zeros([2], { device: 'cuda:0' })).toThrow(DeviceUnavailableError);
    } else {
      const g = await t.to({ device: 'cuda' });
      expect(g.device).toBe('cuda:0');
    }
    expect(() => Tensor.zeros([2], { device: 'tpu' })).toThrow(/Bad device "tpu"/);
  });

  it('does not leak over 10k create/dispose cycles', () => {
    v8.setFlagsFromString('--expose-gc');
    const gc = vm.runInNewContext('gc') as () => void;
    const before = liveTensors();
    const data = new Float32Array(4096);
    const cycle = (n: number) => {
      for (let i = 0; i < n; i++) Tensor.fromArray(data, [4096]).dispose();
    };
    cycle(1000); // warm up allocator pools before the baseline
    gc();
    const rssStart = process.memoryUsage().rss;
    cycle(10000);
    gc();
    expect(liveTensors()).toBe(before);
    // 10k tensors of 16 KiB would be 160 MiB if any stayed alive.
    expect(process.memoryUsage().rss - rssStart).toBeLessThan(48 * 1024 * 1024);
  });

  it('frees tensors that are only dropped, through the garbage collector', async () => {
    v8.setFlagsFromString('--expose-gc');
    const gc = vm.runInNewContext('gc') as () => void;
    const before = liveTensors();
    (() => {
      for (let i = 0; i < 2000; i++) Tensor.zeros([64]);
    })();
    expect(liveTensors()).toBeGreaterThanOrEqual(before + 1000);
    for (let i = 0; i < 20 && liveTensors() > before + 10; i++) {
      gc();
      await new Promise((r) => setImmediate(r));
    }
    expect(liveTensors()).toBeLessThanOrEqual(before + 10);
  });
});

describe('threads', () => {
  it('sets and reads the intra-op thread count, refusing nonsense', () => {
    const before = getNumThreads();
    try {
      setNumThreads(1);
      expect(getNumThreads()).toBe(1);
      expect(info().numThreads).toBe(1);
    } finally {
      setNumThreads(before);
    }
    expect(getNumThreads()).toBe(before);
    expect(() => setNumThreads(0)).toThrow(InvalidArgumentError);
    expect(() => setNumThreads(Number.NaN)).toThrow(InvalidArgumentError);
  });
});
