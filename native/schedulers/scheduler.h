// The interface every diffusion scheduler implements, and the pieces they share: the config rules
// of diffusers' `Scheduler.from_config`, the beta schedules and the numpy-style index arithmetic
// the timestep tables are built with. Each scheduler lives in a file named after the diffusers
// module it matches (ddpm.cc ↔ scheduling_ddpm.py, ...), so the two can be read side by side.
//
// Numerics follow diffusers exactly where it matters for parity: tables (betas, alphas_cumprod,
// sigmas) are float32 tensors built with the same ATen calls; scalar coefficients are float32
// (diffusers computes them on 0-dim float32 tensors) and applied with the same operation order;
// timestep tables reproduce numpy's float64 arithmetic (linspace, arange, round-half-even, interp).
#pragma once

#include <ATen/ATen.h>

#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "core/json.h"
#include "models/config.h"

namespace cd::schedulers {

// Per-call options of step(). Stochastic steps take their noise from `noise` when given (it must
// have the model output's shape), else draw it from `generator` (else from LibTorch's default).
struct StepOptions {
  std::optional<at::Tensor> noise;
  std::optional<at::Generator> generator;
  // One generator per batch item (as diffusers' randn_tensor with a list of generators): item i's
  // noise is drawn from generators[i] alone, so image i of a batch reproduces on its own.
  std::vector<at::Generator> generators;
  double eta = 0.0;                     // DDIM: η (0 = deterministic DDIM, 1 = DDPM-like)
  bool useClippedModelOutput = false;   // DDIM
  double sChurn = 0.0;                  // Euler: churn (0 = deterministic)
  double sTmin = 0.0;
  double sTmax = std::numeric_limits<double>::infinity();
  double sNoise = 1.0;
};

// A scheduler config after diffusers' from_config rules (see BuildConfig below).
class EffectiveConfig {
 public:
  // Typed reading of the effective values (every key of the class is present, defaults filled in).
  models::ConfigReader& reader() { return *reader_; }
  // The effective config as JSON: the class's keys in diffusers' signature order, then the keys
  // kept for other scheduler classes (diffusers' "hidden" config), `_class_name`, and
  // `_use_default_values` (the keys that took the class default, so a later from_config of another
  // class gives that class its own default, as diffusers does).
  const std::string& json() const { return json_; }
  // trained_betas, when set (ConfigReader has no float-list getter).
  const std::optional<std::vector<double>>& trainedBetas() const { return trainedBetas_; }

 private:
  friend EffectiveConfig BuildConfig(const std::string&, const std::vector<std::pair<const char*, const char*>>&,
                                     const std::string&, const std::string&, const std::string&);
  std::unique_ptr<models::ConfigReader> reader_;
  std::string json_;
  std::optional<std::vector<double>> trainedBetas_;
};

// Applies diffusers' `Class.from_config(config, **overrides)` rules:
// * keys listed in the config's `_use_default_values` count as absent (the class default applies);
// * keys absent from the config take the class default (`defaults`: key → default as JSON, in the
//   order of the class's __init__ signature);
// * keys that belong only to other diffusers schedulers (e.g. `skip_prk_steps` in a DDIM config)
//   are kept but do not affect this class, as in diffusers;
// * any other key is a MODEL_CONFIG error (diffusers would only warn: we refuse, since an option we
//   do not know could change the computation);
// * `overrides` (a JSON object, or empty) replace config values; each must be a key of this class.
// Python's JSON extensions (Infinity, -Infinity, as diffusers writes lambda_min_clipped) are read.
EffectiveConfig BuildConfig(const std::string& className,
                            const std::vector<std::pair<const char*, const char*>>& defaults,
                            const std::string& configText, const std::string& overridesText,
                            const std::string& file);

class Scheduler {
 public:
  virtual ~Scheduler() = default;
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // The diffusers class this scheduler matches, e.g. "DDIMScheduler".
  virtual const char* className() const = 0;
  const std::string& configJson() const { return configJson_; }
  const std::string& predictionType() const { return predictionType_; }
  int numTrainTimesteps() const { return numTrainTimesteps_; }
  // Steps requested by the last setTimesteps (0 before; DPM-Solver counts its actual timesteps).
  int numInferenceSteps() const { return numInferenceSteps_; }

  // Builds the inference timesteps (and sigmas) for n steps and resets all step state.
  virtual void setTimesteps(int n) = 0;
  // The timesteps to loop over: int64 for DDPM/DDIM/PNDM/DPM-Solver, float32 for Euler (CPU).
  const at::Tensor& timesteps() const { return timesteps_; }
  // The noise levels σ (float32, one more than the timesteps, last usually 0), or undefined for the
  // schedulers that work on alphas_cumprod directly.
  const at::Tensor& sigmas() const { return sigmas_; }
  virtual double initNoiseSigma() const { return 1.0; }
  virtual at::Tensor scaleModelInput(const at::Tensor& sample, double t) { return sample; }
  // One denoising step from timestep t: the previous (less noisy) sample.
  virtual at::Tensor step(const at::Tensor& modelOutput, double t, const at::Tensor& sample,
                          const StepOptions& options) = 0;

  // The forward process x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·noise (timesteps: int64, one per batch item).
  // Sigma-based schedulers override it the way diffusers does (σ of the timestep in the schedule).
  virtual at::Tensor addNoise(const at::Tensor& x0, const at::Tensor& noise, const at::Tensor& timesteps);
  // v = √ᾱ_t·noise − √(1−ᾱ_t)·x0 (DDPMScheduler.get_velocity, for every scheduler).
  at::Tensor getVelocity(const at::Tensor& x0, const at::Tensor& noise, const at::Tensor& timesteps);
  // What the model is trained to predict: noise (epsilon), v (v_prediction) or x0 (sample).
  at::Tensor trainingTarget(const at::Tensor& x0, const at::Tensor& noise, const at::Tensor& timesteps);

  const at::Tensor& betas() const { return betas_; }
  const at::Tensor& alphasCumprod() const { return alphasCumprod_; }

  // The position in the schedule of the next step (multistep/sigma schedulers; -1 when not started
  // or not tracked), and diffusers' set_begin_index for starting mid-schedule (img2img).
  int64_t stepIndex() const { return stepIndex_; }
  void setBeginIndex(int64_t i);

 protected:
  Scheduler() = default;
  // Reads the keys every scheduler shares and builds betas/alphas_cumprod. `schedules` lists the
  // beta_schedule values the class accepts; `hasRescale` whether it has rescale_betas_zero_snr, and
  // `floorLastAlpha` whether it then lifts the last ᾱ from 0 to 2^-24 (the σ-based schedulers, so
  // the first σ stays finite).
  void InitCommon(EffectiveConfig& cfg, const std::vector<std::string>& schedules, bool hasRescale,
                  bool floorLastAlpha = false);
  // t as an integer timestep in [0, num_train_timesteps) (the alphas_cumprod-indexed schedulers).
  int64_t IntTimestep(double t) const;
  float AlphaCumprod(int64_t t) const { return alphasCumprodHost_[static_cast<size_t>(t)]; }
  // The noise of a stochastic step: options.noise (checked and converted), else a draw.
  static at::Tensor StepNoise(const at::Tensor& like, const StepOptions& options, at::ScalarType dtype);
  void RequireTimesteps(const char* what) const;
  // diffusers' index_for_timestep: the position of t in the schedule (the second one when it occurs
  // twice); `fallbackLast` gives the last index instead of an error when t is absent (DPM-Solver).
  int64_t IndexForTimestep(double t, bool fallbackLast) const;
  // Every position of t in the schedule.
  std::vector<int64_t> TimestepPositions(double t) const;
  void InitStepIndex(double t, bool fallbackLast);

  std::string configJson_;
  std::string predictionType_ = "epsilon";
  std::string timestepSpacing_;
  int numTrainTimesteps_ = 1000;
  int stepsOffset_ = 0;
  std::string betaSchedule_;
  int numInferenceSteps_ = 0;
  at::Tensor betas_, alphas_, alphasCumprod_;
  std::vector<float> alphasCumprodHost_;
  at::Tensor timesteps_, sigmas_;
  int64_t stepIndex_ = -1;
  int64_t beginIndex_ = -1;
};

// Creates a scheduler. kind: "ddpm" | "ddim" | "pndm" | "dpmsolver++" | "euler" |
// "euler_ancestral", a diffusers class name ("DDIMScheduler", ...), or "auto" (the config's
// `_class_name`). `file` names the config in error messages.
std::unique_ptr<Scheduler> CreateScheduler(const std::string& kind, const std::string& configText,
                                           const std::string& overridesText, const std::string& file);

// Training, as the reference scripts do it: the batch's timesteps, either `given` (checked: n
// integers in [0, num_train_timesteps)) or n uniform draws from `generator` (on its own device, then
// moved, as diffusers' randn_tensor) or from LibTorch's default generator, on `device`.
at::Tensor TrainingTimesteps(const Scheduler& scheduler, const at::Tensor& given, int64_t n,
                             const std::optional<at::Generator>& generator, c10::Device device);

// DDPMScheduler.add_noise and the prediction target (noise, v or x0) with the same operations, in
// float32; the range is not re-checked on the device (that would cost a sync per step).
struct TrainingSample {
  at::Tensor noisy, target;
};
TrainingSample NoiseForTraining(const Scheduler& scheduler, const at::Tensor& latents, const at::Tensor& noise,
                                const at::Tensor& timesteps);

// Scalar float32 math done by ATen on 0-dim CPU tensors, as diffusers does it on its 0-dim tensors:
// ATen's sqrt/log/exp are not always the correctly rounded values of libm (one ulp apart, e.g.
// sqrt(62.463795f)), and that last bit would show in every later step.
namespace f32 {
float Sqrt(float x);
float Log(float x);
float Exp(float x);
}  // namespace f32

// numpy-compatible helpers (float64, as the timestep tables are computed in diffusers).
namespace np {
// np.linspace(start, stop, num) (endpoint=True).
std::vector<double> Linspace(double start, double stop, int64_t num);
// np.arange(start, stop, step) for floating-point arguments.
std::vector<double> Arange(double start, double stop, double step);
// np.round: round half to even.
double Round(double x);
// np.interp(x, arange(0, fp.size()), fp).
double InterpIndex(double x, const std::vector<double>& fp);
}  // namespace np

// The `timestep_spacing` table that DDPM, DDIM and PNDM share (descending): "linspace",
// "leading" (with steps_offset) or "trailing" over num_train_timesteps T, for n inference steps.
// Checks 1 <= n <= T, naming `className` in the error.
std::vector<int64_t> SpacedTimesteps(const char* className, const std::string& spacing, int T, int n, int stepsOffset);

// The shared sigma helpers of the Karras-family schedulers (EulerDiscrete, DPMSolverMultistep).
// σ table ((1−ᾱ)/ᾱ)^½ as float32, indexed by training timestep.
std::vector<float> SigmaTable(const at::Tensor& alphasCumprod);
// np.log of a float32 value as numpy computes it on x86-64 with AVX2 or AVX-512 (its own rational
// approximation, up to ~4 ulp from the true value; neither libm's logf nor ATen's log): the
// timesteps of Karras/exponential σ schedules are interpolated in these logs.
float NumpyLogf(float x);
// np.log of the float32 σ table.
std::vector<float> LogSigmaTable(const std::vector<float>& sigmas);
// _sigma_to_t: the fractional training timestep of σ by interpolating log σ.
double SigmaToT(double sigma, const std::vector<float>& logSigmas);
// _convert_to_karras (ρ = 7) and _convert_to_exponential between sigmaMax and sigmaMin.
std::vector<double> KarrasSigmas(double sigmaMin, double sigmaMax, int n);
std::vector<double> ExponentialSigmas(double sigmaMin, double sigmaMax, int n);

}  // namespace cd::schedulers
