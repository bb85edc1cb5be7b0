/**
 * A minimal ZIP writer for torch.save archives: every entry is stored (no compression) with its
 * CRC-32 and sizes in the local header, and the data of each entry starts at a multiple of
 * `align` bytes (torch pads with an extra field of id `FB` so tensors can be memory-mapped where
 * they lie; readers that do not know the field skip it). Archives are limited to 4 GiB and 65,535
 * entries (no ZIP64), far above what a delta needs.
 *
 * @internal
 * @packageDocumentation
 */
import * as zlib from 'zlib';
import { InvalidArgumentError } from '../errors';

export interface ZipEntry {
  /** Path inside the archive (UTF-8, `/`-separated). */
  name: string;
  data: Uint8Array;
}

const LOCAL_SIG = 0x04034b50;
const CENTRAL_SIG = 0x02014b50;
const EOCD_SIG = 0x06054b50;
const VERSION = 20; // 2.0: stored entries, folders
const FLAG_UTF8 = 0x0800;
const DOS_DATE_1980_01_01 = (0 << 9) | (1 << 5) | 1;
const PAD_FIELD_ID = 0x4246; // 'FB', as torch writes it
const MAX32 = 0xffffffff;

/** CRC-32 (IEEE) of `data`. */
export function crc32(data: Uint8Array): number {
  return (zlib as unknown as { crc32(d: Uint8Array, v?: number): number }).crc32(data) >>> 0;
}

/**
 * Lays out a stored ZIP archive and returns it as chunks to write in order (entry data is not
 * copied). Throws an {@link InvalidArgumentError} for duplicate names or an archive past the
 * ZIP32 limits.
 */
export function buildStoredZip(entries: readonly ZipEntry[], options: { align?: number } = {}): Uint8Array[] {
  const align = options.align ?? 64;
  if (!Number.isInteger(align) || align < 1 || align > 0x8000) throw new InvalidArgumentError(`zip alignment must be 1…32768, got ${align}`);
  if (entries.length > 0xffff) throw new InvalidArgumentError(`a ZIP archive without ZIP64 holds at most 65535 entries, got ${entries.length}`);
  const seen = new Set<string>();
  const chunks: Uint8Array[] = [];
  const central: Uint8Array[] = [];
  let offset = 0;
  for (const e of entries) {
    if (seen.has(e.name)) throw new InvalidArgumentError(`two ZIP entries are named ${e.name}`);
    seen.add(e.name);
    const name = Buffer.from(e.name, 'utf8');
    const crc = crc32(e.data);
    const size = e.data.byteLength;
    // Always a padding field (possibly empty), so every data record can be aligned.
    const pad = (align - ((offset + 30 + name.length + 4) % align)) % align;
    const extraLen = 4 + pad;
    if (offset + 30 + name.length + extraLen + size > MAX32) {
      throw new InvalidArgumentError('the archive would exceed 4 GiB, which needs ZIP64 (not supported by this writer)');
    }
    const local = Buffer.alloc(30 + name.length + extraLen);
    local.writeUInt32LE(LOCAL_SIG, 0);
    local.writeUInt16LE(VERSION, 4);
    local.writeUInt16LE(FLAG_UTF8, 6);
    local.writeUInt16LE(0, 8); // stored
    local.writeUInt16LE(0, 10); // time 00:00:00
    local.writeUInt16LE(DOS_DATE_1980_01_01, 12);
    local.writeUInt32LE(crc, 14);
    local.writeUInt32LE(size, 18);
    local.writeUInt32LE(size, 22);
    local.writeUInt16LE(name.length, 26);
    local.writeUInt16LE(extraLen, 28);
    name.copy(local, 30);
    local.writeUInt16LE(PAD_FIELD_ID, 30 + name.length);
    local.writeUInt16LE(pad, 32 + name.length);
    local.fill(0x5a, 34 + name.length); // 'Z', like torch
    const cd = Buffer.alloc(46 + name.length);
    cd.writeUInt32LE(CENTRAL_SIG, 0);
    cd.writeUInt16LE(VERSION, 4); // made by: MS-DOS attributes, 2.0
    cd.writeUInt16LE(VERSION, 6);
    cd.writeUInt16LE(FLAG_UTF8, 8);
    cd.writeUInt16LE(0, 10);
    cd.writeUInt16LE(0, 12);
    cd.writeUInt16LE(DOS_DATE_1980_01_01, 14);
    cd.writeUInt32LE(crc, 16);
    cd.writeUInt32LE(size, 20);
    cd.writeUInt32LE(size, 24);
    cd.writeUInt16LE(name.length, 28);
    // extra 0, comment 0, disk 0, internal 0, external 0
    cd.writeUInt32LE(offset, 42);
    name.copy(cd, 46);
    central.push(cd);
    chunks.push(local, e.data);
    offset += local.length + size;
  }
  const cdOffset = offset;
  const cdSize = central.reduce((s, c) => s + c.length, 0);
  if (cdOffset + cdSize + 22 > MAX32) throw new InvalidArgumentError('the archive would exceed 4 GiB, which needs ZIP64 (not supported by this writer)');
  const eocd = Buffer.alloc(22);
  eocd.writeUInt32LE(EOCD_SIG, 0);
  eocd.writeUInt16LE(entries.length, 8);
  eocd.writeUInt16LE(entries.length, 10);
  eocd.writeUInt32LE(cdSize, 12);
  eocd.writeUInt32LE(cdOffset, 16);
  return [...chunks, ...central, eocd];
}
