/**
 * Atomic file writes: the bytes go to a temporary file in the target's folder, which is flushed to
 * disk (fsync) and then renamed over the target, so a reader sees either the old file or the whole
 * new one, never a partial file, even after a crash or power loss.
 *
 * @packageDocumentation
 */
import { promises as fs } from 'fs';
import * as path from 'path';
import { FileError } from '../errors';

/**
 * Writes `data` (one buffer, a string, or a list of chunks written in order) to `file` atomically:
 * temporary sibling file, fsync, rename, then an fsync of the folder where the platform allows it.
 * Missing parent folders are created. Errors are {@link FileError}s naming the target; the
 * temporary file is removed on failure.
 */
export async function writeFileAtomic(file: string, data: string | Uint8Array | readonly Uint8Array[]): Promise<void> {
  const target = path.resolve(file);
  const dir = path.dirname(target);
  const tmp = path.join(dir, `.${path.basename(target)}.tmp-${process.pid}-${Math.random().toString(36).slice(2)}`);
  try {
    await fs.mkdir(dir, { recursive: true });
    const handle = await fs.open(tmp, 'w');
    try {
      if (typeof data === 'string' || data instanceof Uint8Array) {
        await handle.writeFile(data);
      } else {
        for (const chunk of data) {
          let done = 0;
          while (done < chunk.byteLength) {
            const { bytesWritten } = await handle.write(chunk, done, chunk.byteLength - done);
            done += bytesWritten;
          }
        }
      }
      await handle.sync();
    } finally {
      await handle.close();
    }
    await fs.rename(tmp, target);
  } catch (e) {
    await fs.rm(tmp, { force: true }).catch(() => undefined);
    throw new FileError(`Cannot write ${target}: ${(e as Error).message}`, target, { cause: e });
  }
  // Persist the rename itself (directories cannot be opened for fsync on Windows: best effort).
  try {
    const d = await fs.open(dir, 'r');
    try {
      await d.sync();
    } finally {
      await d.close();
    }
  } catch {
    /* not supported here */
  }
}
