/**
 * A small pickle writer (protocol 2, the protocol torch.save uses) for the data a torch file
 * holds: None, bools, ints, floats, str, lists, tuples, dicts, globals, `callable(*args)` reductions
 * and persistent ids. It writes only opcodes that Python's pickle, torch's `weights_only` unpickler
 * and our restricted reader (native/core/pickle.cc) all understand. Only reductions are memoised: a
 * {@link PickleReduce} object written twice loads as one object (as torch.save writes a tensor
 * reached twice); every other value is written where it appears.
 *
 * @internal
 * @packageDocumentation
 */
import { InvalidArgumentError } from '../errors';

/** A Python tuple. */
export class PickleTuple {
  constructor(readonly items: readonly PickleValue[]) {}
}

/** A Python float even when the value is integral (`2` would be written as an int). */
export class PickleFloat {
  constructor(readonly value: number) {}
}

/** A module-level Python object named by `module.name` (written with GLOBAL). */
export class PickleGlobal {
  constructor(
    readonly module: string,
    readonly name: string,
  ) {}
}

/** `callable(*args)`, as pickle's REDUCE builds it when loading. */
export class PickleReduce {
  constructor(
    readonly callable: PickleGlobal,
    readonly args: PickleTuple,
  ) {}
}

/** A persistent id (BINPERSID): the loader resolves it, e.g. to a tensor storage. */
export class PicklePersistentId {
  constructor(readonly id: PickleValue) {}
}

/**
 * A value the writer can encode. Safe integers (|x| < 2^53) become ints (use {@link PickleFloat}
 * for a float), other numbers floats, bigints ints; arrays become lists; Maps and plain
 * objects become dicts with string keys, in insertion order.
 */
export type PickleValue =
  | null
  | boolean
  | number
  | bigint
  | string
  | PickleValue[]
  | PickleTuple
  | PickleFloat
  | PickleGlobal
  | PickleReduce
  | PicklePersistentId
  | Map<string, PickleValue>
  | { [key: string]: PickleValue };

// Opcodes (pickletools names).
const PROTO = 0x80;
const STOP = 0x2e;
const MARK = 0x28;
const NONE = 0x4e;
const NEWTRUE = 0x88;
const NEWFALSE = 0x89;
const BININT = 0x4a;
const BININT1 = 0x4b;
const BININT2 = 0x4d;
const LONG1 = 0x8a;
const BINFLOAT = 0x47;
const BINUNICODE = 0x58;
const EMPTY_LIST = 0x5d;
const APPEND = 0x61;
const APPENDS = 0x65;
const EMPTY_TUPLE = 0x29;
const TUPLE = 0x74;
const TUPLE1 = 0x85;
const TUPLE2 = 0x86;
const TUPLE3 = 0x87;
const EMPTY_DICT = 0x7d;
const SETITEM = 0x73;
const SETITEMS = 0x75;
const GLOBAL = 0x63;
const REDUCE = 0x52;
const BINPERSID = 0x51;
const BINPUT = 0x71;
const LONG_BINPUT = 0x72;
const BINGET = 0x68;
const LONG_BINGET = 0x6a;

/** Python's pickler batches APPENDS/SETITEMS by this many items. */
const BATCH = 1000;

class ByteSink {
  private buf = Buffer.alloc(1 << 12);
  length = 0;

  private reserve(n: number): void {
    if (this.length + n <= this.buf.length) return;
    let size = this.buf.length * 2;
    while (size < this.length + n) size *= 2;
    const next = Buffer.alloc(size);
    this.buf.copy(next, 0, 0, this.length);
    this.buf = next;
  }

  byte(b: number): void {
    this.reserve(1);
    this.buf[this.length++] = b;
  }

  bytes(b: Uint8Array): void {
    this.reserve(b.length);
    this.buf.set(b, this.length);
    this.length += b.length;
  }

  u16(v: number): void {
    this.reserve(2);
    this.buf.writeUInt16LE(v, this.length);
    this.length += 2;
  }

  i32(v: number): void {
    this.reserve(4);
    this.buf.writeInt32LE(v, this.length);
    this.length += 4;
  }

  u32(v: number): void {
    this.reserve(4);
    this.buf.writeUInt32LE(v, this.length);
    this.length += 4;
  }

  f64be(v: number): void {
    this.reserve(8);
    this.buf.writeDoubleBE(v, this.length);
    this.length += 8;
  }

  result(): Uint8Array {
    return new Uint8Array(this.buf.buffer, this.buf.byteOffset, this.length);
  }
}

function isPlainObject(v: object): v is { [key: string]: PickleValue } {
  const proto = Object.getPrototypeOf(v) as unknown;
  return proto === Object.prototype || proto === null;
}

/** Minimal two's-complement little-endian bytes of a bigint (pickle's LONG1 payload). */
function longBytes(v: bigint): Uint8Array {
  if (v === 0n) return new Uint8Array(0);
  const out: number[] = [];
  let x = v;
  for (;;) {
    out.push(Number(x & 0xffn));
    x >>= 8n;
    const signBit = (out[out.length - 1] & 0x80) !== 0;
    if ((x === 0n && !signBit) || (x === -1n && signBit)) break;
  }
  return Uint8Array.from(out);
}

/** Encodes `value` as a protocol-2 pickle (PROTO 2 … STOP). */
export function dumpPickle(value: PickleValue): Uint8Array {
  const out = new ByteSink();
  const seen = new Set<object>();
  const memo = new Map<PickleReduce, number>();

  const int = (v: number | bigint): void => {
    if (typeof v === 'number' && v >= 0 && v <= 0xff) {
      out.byte(BININT1);
      out.byte(v);
    } else if (typeof v === 'number' && v >= 0 && v <= 0xffff) {
      out.byte(BININT2);
      out.u16(v);
    } else if (typeof v === 'number' && v >= -0x80000000 && v <= 0x7fffffff) {
      out.byte(BININT);
      out.i32(v);
    } else {
      const b = longBytes(BigInt(v));
      if (b.length > 255) throw new InvalidArgumentError('pickle writer: integers wider than 255 bytes are not supported');
      out.byte(LONG1);
      out.byte(b.length);
      out.bytes(b);
    }
  };

  const str = (s: string): void => {
    const b = Buffer.from(s, 'utf8');
    out.byte(BINUNICODE);
    out.u32(b.length);
    out.bytes(b);
  };

  const line = (s: string): void => {
    if (/[\n\r]/.test(s)) throw new InvalidArgumentError(`pickle writer: a global name cannot hold a line break (${JSON.stringify(s)})`);
    out.bytes(Buffer.from(s + '\n', 'utf8'));
  };

  const tuple = (items: readonly PickleValue[]): void => {
    if (items.length === 0) {
      out.byte(EMPTY_TUPLE);
      return;
    }
    if (items.length <= 3) {
      for (const x of items) walk(x);
      out.byte([TUPLE1, TUPLE2, TUPLE3][items.length - 1]);
      return;
    }
    out.byte(MARK);
    for (const x of items) walk(x);
    out.byte(TUPLE);
  };

  const walk = (v: PickleValue): void => {
    if (v === null) return out.byte(NONE);
    switch (typeof v) {
      case 'boolean':
        return out.byte(v ? NEWTRUE : NEWFALSE);
      case 'bigint':
        return int(v);
      case 'number':
        if (Number.isSafeInteger(v) && !Object.is(v, -0)) return int(v);
        out.byte(BINFLOAT);
        return out.f64be(v);
      case 'string':
        return str(v);
      case 'object':
        break;
      default:
        throw new InvalidArgumentError(`pickle writer: cannot encode a ${typeof v}`);
    }
    if (v instanceof PickleFloat) {
      out.byte(BINFLOAT);
      return out.f64be(v.value);
    }
    if (v instanceof PickleGlobal) {
      out.byte(GLOBAL);
      line(v.module);
      line(v.name);
      return;
    }
    if (seen.has(v)) throw new InvalidArgumentError('pickle writer: the value is cyclic');
    seen.add(v);
    try {
      if (v instanceof PickleTuple) return tuple(v.items);
      if (v instanceof PickleReduce) {
        const at = memo.get(v);
        if (at !== undefined) {
          if (at <= 0xff) {
            out.byte(BINGET);
            out.byte(at);
          } else {
            out.byte(LONG_BINGET);
            out.u32(at);
          }
          return;
        }
        walk(v.callable);
        tuple(v.args.items);
        out.byte(REDUCE);
        const index = memo.size;
        memo.set(v, index);
        if (index <= 0xff) {
          out.byte(BINPUT);
          out.byte(index);
        } else {
          out.byte(LONG_BINPUT);
          out.u32(index);
        }
        return;
      }
      if (v instanceof PicklePersistentId) {
        walk(v.id);
        return out.byte(BINPERSID);
      }
      if (Array.isArray(v)) {
        out.byte(EMPTY_LIST);
        for (let i = 0; i < v.length; i += BATCH) {
          const batch = v.slice(i, i + BATCH);
          if (batch.length === 1) {
            walk(batch[0]);
            out.byte(APPEND);
          } else {
            out.byte(MARK);
            for (const x of batch) walk(x);
            out.byte(APPENDS);
          }
        }
        return;
      }
      let entries: [string, PickleValue][];
      if (v instanceof Map) entries = [...v.entries()];
      else if (isPlainObject(v)) entries = Object.entries(v);
      else throw new InvalidArgumentError(`pickle writer: cannot encode an object of class ${(v as object).constructor?.name ?? '?'}`);
      out.byte(EMPTY_DICT);
      for (let i = 0; i < entries.length; i += BATCH) {
        const batch = entries.slice(i, i + BATCH);
        if (batch.length === 1) {
          str(batch[0][0]);
          walk(batch[0][1]);
          out.byte(SETITEM);
        } else {
          out.byte(MARK);
          for (const [k, x] of batch) {
            if (typeof k !== 'string') throw new InvalidArgumentError('pickle writer: dict keys must be strings');
            str(k);
            walk(x);
          }
          out.byte(SETITEMS);
        }
      }
    } finally {
      seen.delete(v);
    }
  };

  out.byte(PROTO);
  out.byte(2);
  walk(value);
  out.byte(STOP);
  return out.result();
}
