/**
 * Typed view of the addon's `delta` object (native/custom_diffusion/bind_delta.cc).
 * @internal
 */
import { nativeAs, type Dtype, type NativeCancelToken, type NativeProgress, type NativeTensor } from '../native';

export interface NativeComposeLayer {
  name: string;
  constraintResidual: number;
  relConstraintResidual: number;
  regError: number;
}

export interface NativeCompressLayer {
  name: string;
  u: NativeTensor;
  v: NativeTensor;
  rank: number;
  relError: number;
  keptFraction: number;
  zeroRank: boolean;
}

export interface NativeDeltaBinding {
  delta: {
    compose(
      baseLayers: Record<string, NativeTensor>,
      concepts: { keys: NativeTensor; weights: Record<string, NativeTensor> }[],
      regKeys: NativeTensor,
      options: { outDtype?: Dtype },
      onProgress?: (p: NativeProgress) => void,
      token?: NativeCancelToken,
    ): Promise<{
      weights: Record<string, NativeTensor>;
      layers: NativeComposeLayer[];
      targetRows: number;
      duplicateRows: number;
      regRows: number;
      solver: string;
    }>;
    compress(
      tuned: Record<string, NativeTensor>,
      base: Record<string, NativeTensor>,
      options: { ratio?: number; rank?: number; keepCrossing?: boolean; outDtype?: Dtype },
      token?: NativeCancelToken,
    ): Promise<{ layers: NativeCompressLayer[] }>;
    assign(dst: NativeTensor[], src: NativeTensor[]): void;
    addProduct(dst: NativeTensor, u: NativeTensor, v: NativeTensor): void;
    clone(t: NativeTensor): NativeTensor;
  };
}

export function deltaBinding(): NativeDeltaBinding['delta'] {
  return nativeAs<NativeDeltaBinding>().delta;
}
