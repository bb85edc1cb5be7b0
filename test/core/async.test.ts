import { AbortError, InvalidArgumentError, NativeError, OutOfMemoryError } from '../../src';
import { callAsync, callCancellable, native, type NativeProgress } from '../../src/native';

describe('native work on worker threads', () => {
  it.each([
    ['c10', NativeError, /a c10 error raised on purpose/],
    ['std', NativeError, /a std::runtime_error raised on purpose/],
    ['cd', InvalidArgumentError, /a library error raised on purpose/],
    ['alloc', OutOfMemoryError, /Out of host memory/],
    ['shape', NativeError, /cannot be multiplied \(2x3 and 4x5\)/],
  ])('turns a %s exception thrown on a worker into a rejected promise', async (kind, cls, message) => {
    const p = callAsync(() => native().selftest.throwInWorker(kind));
    await expect(p).rejects.toBeInstanceOf(cls);
    await expect(callAsync(() => native().selftest.throwInWorker(kind))).rejects.toThrow(message);
  });

  it('never shows the C++ backtrace of a c10 error', async () => {
    const err = await callAsync(() => native().selftest.throwInWorker('c10')).catch((e: Error) => e);
    expect((err as Error).message).not.toMatch(/frame #|Exception raised from/);
  });

  it('delivers progress in order, all before the promise settles', async () => {
    const seen: number[] = [];
    const done = await callCancellable(undefined, (token) =>
      native().selftest.countdown(8, 2, (p: NativeProgress) => seen.push(p.step as number), token),
    );
    expect(done).toBe(8);
    expect(seen).toEqual([1, 2, 3, 4, 5, 6, 7, 8]);
  });

  it('keeps the event loop free while the work runs', async () => {
    let ticks = 0;
    const timer = setInterval(() => ticks++, 10);
    await callAsync(() => native().selftest.countdown(20, 15));
    clearInterval(timer);
    expect(ticks).toBeGreaterThan(10);
  });

  it('stops a long native loop when its AbortSignal fires', async () => {
    const controller = new AbortController();
    const seen: number[] = [];
    const p = callCancellable(controller.signal, (token) =>
      native().selftest.countdown(1000, 5, (ev: NativeProgress) => {
        seen.push(ev.step as number);
        if (ev.step === 3) controller.abort();
      }, token),
    );
    await expect(p).rejects.toBeInstanceOf(AbortError);
    expect(seen.length).toBeGreaterThanOrEqual(3);
    expect(seen.length).toBeLessThan(1000);
  });

  it('rejects at once when the signal was aborted before the call', async () => {
    const controller = new AbortController();
    controller.abort(new Error('user pressed stop'));
    await expect(callCancellable(controller.signal, (t) => native().selftest.countdown(5, 1, undefined, t))).rejects.toThrow(
      /aborted: user pressed stop/,
    );
  });
});

describe('thread count on worker threads', () => {
  it('applies setNumThreads to the native work that runs off the JS thread', async () => {
    const { setNumThreads, getNumThreads } = await import('../../src');
    const before = getNumThreads();
    try {
      for (const n of [1, 2]) {
        setNumThreads(n);
        // Several calls, so more than one libuv worker is exercised.
        const seen = await Promise.all(Array.from({ length: 4 }, () => callAsync(() => native().selftest.workerNumThreads())));
        expect(seen).toEqual([n, n, n, n]);
      }
    } finally {
      setNumThreads(before);
    }
  });
});
