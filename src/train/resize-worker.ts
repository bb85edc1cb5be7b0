/**
 * Worker thread of {@link resizeRgb}'s Pillow engine: the byte-exact Pillow port is plain
 * TypeScript and takes 0.3-0.5 s for a large photo, which must not run on the event loop.
 */
import { parentPort } from 'worker_threads';
import { resizeRgbSync, type ResampleFilter } from './images';

interface Job {
  id: number;
  width: number;
  height: number;
  data: Uint8Array;
  targetWidth: number;
  targetHeight: number;
  filter: ResampleFilter;
}

parentPort?.on('message', (job: Job) => {
  try {
    const out = resizeRgbSync({ width: job.width, height: job.height, data: job.data }, job.targetWidth, job.targetHeight, job.filter);
    const data = out.data;
    parentPort!.postMessage({ id: job.id, data }, [data.buffer as ArrayBuffer]);
  } catch (e) {
    parentPort!.postMessage({ id: job.id, error: (e as Error).message });
  }
});
