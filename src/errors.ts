/**
 * Typed errors of custom-diffusion. Every error the library throws is a {@link CustomDiffusionError};
 * its `code` is stable and machine-readable, its message says what went wrong and what to do.
 *
 * @packageDocumentation
 */

/** Base class of every error thrown by this library. */
export class CustomDiffusionError extends Error {
  /** A stable machine-readable code, e.g. `SAFETENSORS_FORMAT`. */
  readonly code: string;

  constructor(message: string, code = 'CUSTOM_DIFFUSION_ERROR', options?: { cause?: unknown }) {
    super(message, options);
    this.name = new.target.name;
    this.code = code;
  }
}

/** LibTorch could not be found, or the native addon could not be loaded against it. */
export class NativeLoadError extends CustomDiffusionError {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, 'NATIVE_LOAD', options);
  }
}

/** An error raised inside LibTorch or our native code (shape mismatch, out of memory, ...). */
export class NativeError extends CustomDiffusionError {
  constructor(message: string, code = 'NATIVE', options?: { cause?: unknown }) {
    super(message, code, options);
  }
}

/** The native layer ran out of memory (host or device). */
export class OutOfMemoryError extends NativeError {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, 'OUT_OF_MEMORY', options);
  }
}

/** A safetensors file is malformed; `file` and (where known) `tensor` name the culprit. */
export class SafetensorsError extends CustomDiffusionError {
  readonly file: string;
  readonly tensor: string | undefined;

  constructor(message: string, file: string, tensor?: string, options?: { cause?: unknown }) {
    super(message, 'SAFETENSORS_FORMAT', options);
    this.file = file;
    this.tensor = tensor;
  }
}

/** A file could not be read or written (missing, permission denied, disk full). */
export class FileError extends CustomDiffusionError {
  readonly file: string;

  constructor(message: string, file: string, options?: { cause?: unknown }) {
    super(message, 'FILE', options);
    this.file = file;
  }
}

/** An argument was invalid (wrong type, out of range, unknown name). */
export class InvalidArgumentError extends CustomDiffusionError {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, 'INVALID_ARGUMENT', options);
  }
}

/** A requested device (e.g. `cuda:1`) is not available in this LibTorch or on this machine. */
export class DeviceUnavailableError extends CustomDiffusionError {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, 'DEVICE_UNAVAILABLE', options);
  }
}

/** Work was cancelled through an AbortSignal. */
export class AbortError extends CustomDiffusionError {
  constructor(message = 'The operation was aborted.', options?: { cause?: unknown }) {
    super(message, 'ABORT_ERR', options);
  }
}

/** A tensor was used after `dispose()`. */
export class DisposedError extends CustomDiffusionError {
  constructor(message = 'This tensor was disposed; it can no longer be used.') {
    super(message, 'DISPOSED');
  }
}

/**
 * A model folder does not match what the library implements: `MODEL_CONFIG` when its config.json
 * sets an option that is unknown or unsupported (it would change the computation), `MODEL_WEIGHTS`
 * when the weights miss keys, hold unexpected keys or have wrong shapes (all are listed), or come in
 * a format that cannot be read yet. `file` names the config or weights file.
 */
export class ModelError extends CustomDiffusionError {
  readonly file: string;

  constructor(message: string, code: 'MODEL_CONFIG' | 'MODEL_WEIGHTS', file = '', options?: { cause?: unknown }) {
    super(message, code, options);
    this.file = file;
  }
}

/**
 * A torch.save file (`.bin`, `.ckpt`, `.pt`) could not be loaded. `PICKLE_FORMAT`: the file is
 * damaged, truncated or of an unsupported kind (legacy pre-1.6 format, compressed entries,
 * TorchScript); `PICKLE_UNSAFE`: its pickle names a global that would run code when Python unpickles
 * it (`global` names it, e.g. `posix.system`), so it was refused without executing anything.
 * `offset` is the byte offset in the pickle where the problem was found, when known.
 */
export class PickleError extends CustomDiffusionError {
  readonly file: string;
  readonly global: string | undefined;
  readonly offset: number | undefined;

  constructor(
    message: string,
    code: 'PICKLE_FORMAT' | 'PICKLE_UNSAFE',
    file: string,
    details: { global?: string; offset?: number } = {},
    options?: { cause?: unknown },
  ) {
    super(message, code, options);
    this.file = file;
    this.global = details.global;
    this.offset = details.offset;
  }
}

/**
 * Training data could not be used: an image that does not decode or is too small, an empty or
 * missing folder, a malformed concepts list or captions file, a retrieval that could not gather
 * enough images. `file` names the file or folder at fault.
 */
export class DataError extends CustomDiffusionError {
  readonly file: string;

  constructor(message: string, file: string, options?: { cause?: unknown }) {
    super(message, 'DATA', options);
    this.file = file;
  }
}

/**
 * Training could not go on: `TRAIN_NAN` when the loss or the gradients became NaN or infinite
 * (`step` is the optimizer step, 1-based; that step did not update the weights), `TRAIN_STATE` when a
 * checkpoint or optimizer state does not fit the run (other tensors, another base model or data, a
 * save in the middle of a gradient-accumulation cycle).
 */
export class TrainingError extends CustomDiffusionError {
  readonly step: number | undefined;

  constructor(message: string, code: 'TRAIN_NAN' | 'TRAIN_STATE', step?: number, options?: { cause?: unknown }) {
    super(message, code, options);
    this.step = step;
  }
}

/**
 * A delta does not fit the models it is applied to (other layer names or widths, another token
 * width, or another base model unless forced).
 */
export class DeltaMismatchError extends InvalidArgumentError {}

/**
 * A generation request arrived while the model's queue was full (see `queueLimit` of
 * StableDiffusion.load): retry later, or raise the limit.
 */
export class QueueFullError extends CustomDiffusionError {
  constructor(message: string) {
    super(message, 'QUEUE_FULL');
  }
}
