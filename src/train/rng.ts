/**
 * A small seeded pseudo-random generator for the data pipeline: xoshiro128** 1.1 (Blackman and
 * Vigna), seeded with SplitMix64. It is deterministic on every platform (32-bit integer arithmetic
 * only), fast, and its whole state is four 32-bit words, so it serialises to JSON for an exact
 * resume.
 *
 * It is deliberately not numpy's or torch's generator: the original scripts draw from
 * `np.random` and torch's global generator, whose streams we do not reproduce. What is reproduced
 * is the distribution of every draw and the order in which draws are made (see augment.ts).
 *
 * @packageDocumentation
 */
import { InvalidArgumentError } from '../errors';

/** The serialisable state of an {@link Rng}. */
export interface RngState {
  algorithm: 'xoshiro128**';
  /** The four 32-bit state words, as unsigned integers. */
  s: [number, number, number, number];
}

const MASK64 = (1n << 64n) - 1n;
const GOLDEN = 0x9e3779b97f4a7c15n;
/** Odd constant separating streams of the same seed (from Steele et al.'s SplitMix literature). */
const STREAM_STEP = 0xd1b54a32d192ed03n;
const TWO_POW_32 = 4294967296;

function splitmix64(x: bigint): { value: bigint; next: bigint } {
  const next = (x + GOLDEN) & MASK64;
  let z = next;
  z = ((z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n) & MASK64;
  z = ((z ^ (z >> 27n)) * 0x94d049bb133111ebn) & MASK64;
  return { value: z ^ (z >> 31n), next };
}

function toUint64(value: number | bigint, what: string): bigint {
  if (typeof value === 'number') {
    if (!Number.isSafeInteger(value) || value < 0) {
      throw new InvalidArgumentError(`${what} must be a non-negative safe integer or a bigint, got ${value}`);
    }
    return BigInt(value);
  }
  if (typeof value !== 'bigint' || value < 0n || value > MASK64) {
    throw new InvalidArgumentError(`${what} must be an unsigned 64-bit integer, got ${String(value)}`);
  }
  return value;
}

/** A seeded xoshiro128** generator. */
export class Rng {
  private s0 = 0;
  private s1 = 0;
  private s2 = 0;
  private s3 = 0;

  private constructor() {}

  /**
   * A generator seeded with SplitMix64: the SplitMix64 state starts at
   * `seed + stream · 0xD1B54A32D192ED03 (mod 2^64)`, and its first two outputs give the four state
   * words (low word first). Different streams of one seed are independent in practice; stream 0 is
   * the plain seeding.
   */
  static fromSeed(seed: number | bigint, stream: number | bigint = 0): Rng {
    let x = (toUint64(seed, 'seed') + toUint64(stream, 'stream') * STREAM_STEP) & MASK64;
    const a = splitmix64(x);
    x = a.next;
    const b = splitmix64(x);
    const r = new Rng();
    r.s0 = Number(a.value & 0xffffffffn);
    r.s1 = Number(a.value >> 32n);
    r.s2 = Number(b.value & 0xffffffffn);
    r.s3 = Number(b.value >> 32n);
    if ((r.s0 | r.s1 | r.s2 | r.s3) === 0) r.s0 = 1; // the all-zero state is a fixed point
    return r;
  }

  /** A generator positioned exactly at `state`. */
  static fromState(state: RngState): Rng {
    const r = new Rng();
    r.setState(state);
    return r;
  }

  getState(): RngState {
    return { algorithm: 'xoshiro128**', s: [this.s0 >>> 0, this.s1 >>> 0, this.s2 >>> 0, this.s3 >>> 0] };
  }

  setState(state: RngState): void {
    if (
      !state ||
      state.algorithm !== 'xoshiro128**' ||
      !Array.isArray(state.s) ||
      state.s.length !== 4 ||
      !state.s.every((w) => Number.isInteger(w) && w >= 0 && w < TWO_POW_32)
    ) {
      throw new InvalidArgumentError(`Not an xoshiro128** state: ${JSON.stringify(state)}`);
    }
    if (state.s.every((w) => w === 0)) throw new InvalidArgumentError('The all-zero xoshiro128** state is invalid');
    [this.s0, this.s1, this.s2, this.s3] = state.s;
  }

  clone(): Rng {
    return Rng.fromState(this.getState());
  }

  /** The next 32-bit output, as an unsigned integer. */
  nextUint32(): number {
    const s1 = this.s1;
    const m = Math.imul(s1, 5);
    const result = Math.imul((m << 7) | (m >>> 25), 9) >>> 0;
    const t = s1 << 9;
    this.s2 ^= this.s0;
    this.s3 ^= this.s1;
    this.s1 ^= this.s2;
    this.s0 ^= this.s3;
    this.s2 ^= t;
    this.s3 = (this.s3 << 11) | (this.s3 >>> 21);
    return result;
  }

  /** A float in [0, 1) with 32 random bits (one draw). */
  nextFloat(): number {
    return this.nextUint32() / TWO_POW_32;
  }

  /** A uniform integer in [lo, hi], both included, without modulo bias (rejection sampling). */
  int(lo: number, hi: number): number {
    if (!Number.isSafeInteger(lo) || !Number.isSafeInteger(hi) || hi < lo) {
      throw new InvalidArgumentError(`Invalid integer range [${lo}, ${hi}]`);
    }
    const n = hi - lo + 1;
    if (n > TWO_POW_32) throw new InvalidArgumentError(`Integer range [${lo}, ${hi}] is wider than 2^32`);
    if (n === TWO_POW_32) return lo + this.nextUint32();
    const limit = TWO_POW_32 - (TWO_POW_32 % n);
    for (;;) {
      const u = this.nextUint32();
      if (u < limit) return lo + (u % n);
    }
  }

  /** True with probability p. Always makes exactly one draw, whatever p is. */
  bernoulli(p: number): boolean {
    return this.nextFloat() < p;
  }

  /** One element of `items`, uniformly. */
  choice<T>(items: readonly T[]): T {
    if (items.length === 0) throw new InvalidArgumentError('Cannot choose from an empty list');
    return items[this.int(0, items.length - 1)];
  }

  /** Shuffles `items` in place (Fisher–Yates, from the last element down) and returns it. */
  shuffle<T>(items: T[]): T[] {
    for (let i = items.length - 1; i > 0; i--) {
      const j = this.int(0, i);
      const tmp = items[i];
      items[i] = items[j];
      items[j] = tmp;
    }
    return items;
  }

  /** A uniformly random permutation of 0 … n−1. */
  permutation(n: number): number[] {
    return this.shuffle(Array.from({ length: n }, (_, i) => i));
  }
}
