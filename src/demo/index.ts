/**
 * The Custom Diffusion demo on the embedded toy model ({@link runDemo}, `customdiff demo`) and the
 * pieces the quality benchmark reuses.
 *
 * @packageDocumentation
 */
export {
  runDemo,
  resolveDemoModel,
  plainPrompts,
  DEMO_MODEL_DIR,
  DEMO_CONCEPTS,
  DEMO_STAGES,
  type DemoOptions,
  type DemoStage,
  type DemoEvent,
  type DemoResult,
  type DemoMetrics,
  type ConceptScores,
  type PlainScores,
  type TrainingSummary,
} from './demo';
