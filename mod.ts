/**
 * ddpm: train denoising diffusion models and sample them with pluggable
 * solvers, on TensorFlow.js (WebGPU, wasm or cpu) under Deno.
 *
 * - Core: {@linkcode initBackend}, {@linkcode makeSchedule}, {@linkcode qSample},
 *   {@linkcode UNet}, {@linkcode Trainer} (AdamW, clipping, EMA), checkpoints
 *   ({@linkcode saveCheckpoint}, {@linkcode loadUNet}) in PyTorch's layouts.
 * - Samplers: {@linkcode sampleDdpm}, {@linkcode sampleDdim},
 *   {@linkcode sampleDpmSolver}, {@linkcode sampleEuler}, {@linkcode sampleHeun},
 *   and a registry for plugins ({@linkcode registerSampler}).
 * - Data: {@linkcode loadDataset} (MNIST, Fashion-MNIST, the offline
 *   mnist-lite, folders of IDX files) and {@linkcode ImageBatcher}.
 *
 * @example
 * ```ts
 * import { initBackend, makeSchedule, sampleDdim, tf, UNet } from "./mod.ts";
 * await initBackend("cpu");
 * const schedule = makeSchedule(); // T = 1000, linear betas 1e-4 .. 0.02
 * const unet = new UNet({ base: 8, seed: 0 }); // untrained: loadUNet(path) for a real one
 * const x = await sampleDdim(unet, schedule, { n: 1, imgSize: 8, numSteps: 5, seed: 1 });
 * console.log(x.shape); // [1, 8, 8, 1]
 * tf.dispose(x);
 * unet.dispose();
 * schedule.dispose();
 * ```
 *
 * @module
 */
export {
  type BackendInfo,
  type BackendName,
  initBackend,
  tf,
} from "./core/backend.ts";
export { setWasmThreads, wasmThreads } from "./core/wasm_threads.ts";
export { wasmKernelsReady } from "./core/_wasm_kernels.ts";
export {
  type ModelFn,
  type ReplayedModel,
  replayOnWebGpu,
} from "./core/_webgpu_replay.ts";
export { writeFileAtomic } from "./core/atomic.ts";
export {
  extract,
  makeSchedule,
  qSample,
  type Schedule,
  type ScheduleKind,
  type ScheduleOptions,
} from "./core/schedule.ts";
export {
  type ParamMap,
  UNet,
  type UNetConfig,
  unetParamShapes,
} from "./core/unet.ts";
export {
  AdamW,
  ADAMW_DEFAULTS,
  type AdamWConfig,
  type AdamWState,
} from "./core/optim.ts";
export {
  Ema,
  EMA_DEFAULTS,
  type EmaConfig,
  emaDecay,
  type EmaDecayMode,
  type EmaState,
} from "./core/ema.ts";
export {
  clipGradNorm,
  disposeTrainerState,
  type ReplayStats,
  type TrainableModel,
  Trainer,
  type TrainerOptions,
  type TrainerState,
  type TrainStepResult,
} from "./core/train.ts";
export {
  type Checkpoint,
  type CheckpointState,
  encodeCheckpoint,
  type HostTensor,
  loadCheckpoint,
  loadUNet,
  type LoadUNetOptions,
  saveCheckpoint,
  toTfLayout,
  toTorchLayout,
} from "./core/checkpoint.ts";
export {
  decodeSafetensors,
  encodeSafetensors,
  type SafetensorsDtype,
  SafetensorsError,
  type SafetensorsFile,
  type SafetensorsInput,
  type SafetensorsTensor,
} from "./core/safetensors.ts";
export {
  encodeNpy,
  encodePng,
  type GridOptions,
  imagesToGrid,
  plotCurve,
  type PlotOptions,
  type Raster,
  writeNpy,
  writePng,
} from "./core/image.ts";
export {
  type CreateRunOptions,
  loadTrainedModel,
  RUN_FILES,
  type RunFile,
  type RunOverrides,
  type RunSetup,
  type RunSetupInput,
  type SampleRequest,
  type StepMetrics,
  type TrainedModel,
  TrainingRun,
  type TrainOptions,
  type TrainResult,
} from "./core/run.ts";
export {
  type FeatureMoments,
  featureMoments,
  frechetDistance,
} from "./core/frechet.ts";
export {
  CLASSIFIER_CLASSES,
  CLASSIFIER_FEATURES,
  CLASSIFIER_IMAGE_SIZE,
  CLASSIFIER_WEIGHTS,
  classifierForward,
  type ClassifierForwardOptions,
  type ClassifierOutput,
  classifierParamShapes,
  type ClassifierStepResult,
  ClassifierTrainer,
  type ClassifierTrainerOptions,
  DigitClassifier,
  type Embedding,
  encodeClassifier,
  initClassifierParams,
} from "./core/classifier.ts";
export {
  type EvaluateOptions,
  evaluateSamples,
  type Evaluation,
} from "./core/evaluate.ts";
export * from "./samplers/mod.ts";
export {
  type DatasetName,
  DATASETS,
  defaultCacheDir,
  loadDataset,
  type LoadDatasetOptions,
  type LoadedDataset,
  type RemoteDataset,
  type Split,
} from "./data/mnist.ts";
export {
  type Batch,
  type BatcherOptions,
  ImageBatcher,
  type ResizeMode,
} from "./data/batches.ts";
export {
  type IdxPairNames,
  type ImageDataset,
  imageDatasetFromIdx,
} from "./data/dataset.ts";
export {
  decodeIdx,
  type IdxArray,
  type IdxDataType,
  IdxFormatError,
  parseIdx,
  type ParseIdxOptions,
  readIdxFile,
} from "./data/idx.ts";
export { loadIdxDir, type LoadIdxDirOptions } from "./data/idx_dir.ts";
export {
  type DownloadAttempt,
  DownloadError,
  downloadFile,
  type DownloadOptions,
  type DownloadProgress,
  formatProgress,
} from "./data/download.ts";
export { loadMnistLite, MNIST_LITE_PACKAGE } from "./data/mnist_lite.ts";
export {
  type HoldoutSplit,
  holdoutSplit,
  spreadImages,
  type SpreadImagesOptions,
  subsetDataset,
} from "./data/holdout.ts";
