/**
 * One job at a time per model, with a bounded waiting line: a service that receives more requests
 * than it can serve rejects the surplus at once ({@link QueueFullError}) instead of holding an
 * unbounded backlog in memory. A waiting job whose AbortSignal fires leaves the line.
 */
import { AbortError, InvalidArgumentError, QueueFullError } from '../errors';

interface Waiting {
  start: () => void;
  cancel: (e: Error) => void;
  signal?: AbortSignal;
  onAbort?: () => void;
}

export class JobQueue {
  private running = false;
  private readonly waiting: Waiting[] = [];

  /** @param limit how many jobs may wait while one runs (default 16). */
  constructor(private limit = 16) {
    this.setLimit(limit);
  }

  setLimit(limit: number): void {
    if (!Number.isInteger(limit) || limit < 0) throw new InvalidArgumentError('The queue limit must be a non-negative integer');
    this.limit = limit;
  }

  /** Jobs waiting (not counting the running one). */
  get pending(): number {
    return this.waiting.length;
  }

  get busy(): boolean {
    return this.running;
  }

  /** Runs `job` after the jobs before it. Rejects with QueueFullError when `limit` jobs already wait. */
  run<T>(job: () => Promise<T>, signal?: AbortSignal): Promise<T> {
    if (signal?.aborted) return Promise.reject(new AbortError());
    if (!this.running) return this.execute(job);
    if (this.waiting.length >= this.limit) {
      return Promise.reject(
        new QueueFullError(`${this.waiting.length} requests are already waiting for this model (limit ${this.limit}); retry later or raise queueLimit`),
      );
    }
    return new Promise<T>((resolve, reject) => {
      const entry: Waiting = {
        signal,
        start: () => this.execute(job).then(resolve, reject),
        cancel: reject,
      };
      if (signal) {
        entry.onAbort = () => {
          const i = this.waiting.indexOf(entry);
          if (i >= 0) {
            this.waiting.splice(i, 1);
            reject(new AbortError('The request was aborted while it waited in the queue.'));
          }
        };
        signal.addEventListener('abort', entry.onAbort, { once: true });
      }
      this.waiting.push(entry);
    });
  }

  private async execute<T>(job: () => Promise<T>): Promise<T> {
    this.running = true;
    try {
      return await job();
    } finally {
      this.running = false;
      const next = this.waiting.shift();
      if (next) {
        if (next.onAbort) next.signal?.removeEventListener('abort', next.onAbort);
        next.start();
      }
    }
  }
}
