// diffusers AutoencoderKL (models/autoencoders/autoencoder_kl.py) with its Encoder and Decoder
// (autoencoders/vae.py), the blocks they use (DownEncoderBlock2D, UpDecoderBlock2D, UNetMidBlock2D
// in unets/unet_2d_blocks.py; ResnetBlock2D in resnet.py; Downsample2D/Upsample2D) and
// DiagonalGaussianDistribution. Read side by side with those files.
#include "models/autoencoder_kl.h"

#include <set>
#include <sstream>

#include "core/errors.h"
#include "core/json.h"

namespace cd::models {

namespace {

// Every VAE GroupNorm uses eps 1e-6 (diffusers hard-codes it in Encoder/Decoder; the config has no key).
constexpr double kNormEps = 1e-6;

// Older diffusers saved the mid-block attention (then AttentionBlock) as query/key/value/proj_attn;
// diffusers renames them at load (_fix_state_dict_keys_on_load), and so do we.
Weights RenameDeprecatedAttention(Weights in) {
  static const std::pair<const char*, const char*> kRenames[] = {
      {"query.", "to_q."}, {"key.", "to_k."}, {"value.", "to_v."}, {"proj_attn.", "to_out.0."}};
  std::vector<std::pair<std::string, at::Tensor>> out;
  bool changed = false;
  for (const auto& [name, t] : in.tensors()) {
    std::string key = name;
    for (const char* block : {"encoder.mid_block.attentions.0.", "decoder.mid_block.attentions.0."}) {
      if (key.rfind(block, 0) != 0) continue;
      const std::string rest = key.substr(std::string(block).size());
      for (const auto& [from, to] : kRenames) {
        if (rest.rfind(from, 0) == 0) {
          const std::string renamed = std::string(block) + to + rest.substr(std::string(from).size());
          // A file holding both spellings is ambiguous: keep both names so Finish() reports one as unexpected.
          if (!in.tensors().count(renamed)) {
            key = renamed;
            changed = true;
          }
        }
      }
    }
    out.emplace_back(key, t);
  }
  if (!changed) return in;
  return Weights(std::move(out), in.source());
}

AutoencoderKL::Norm GetNorm(const Weights::Scope& s, int64_t c, int64_t groups) {
  return {s.get("weight", {c}), s.get("bias", {c}), groups};
}

AutoencoderKL::Conv GetConv(const Weights::Scope& s, int64_t cin, int64_t cout, int64_t k, int64_t stride,
                            int64_t padding) {
  return {s.get("weight", {cout, cin, k, k}), s.get("bias", {cout}), stride, padding};
}

AutoencoderKL::Resnet GetResnet(const Weights::Scope& s, int64_t cin, int64_t cout, int64_t groups) {
  AutoencoderKL::Resnet r;
  r.norm1 = GetNorm(s.sub("norm1"), cin, groups);
  r.conv1 = GetConv(s.sub("conv1"), cin, cout, 3, 1, 1);
  r.norm2 = GetNorm(s.sub("norm2"), cout, groups);
  r.conv2 = GetConv(s.sub("conv2"), cout, cout, 3, 1, 1);
  if (cin != cout) r.shortcut = GetConv(s.sub("conv_shortcut"), cin, cout, 1, 1, 0);
  return r;
}

AutoencoderKL::MidBlock GetMid(const Weights::Scope& s, int64_t c, int64_t groups, bool attention) {
  AutoencoderKL::MidBlock m;
  m.resnets.push_back(GetResnet(s.sub("resnets").sub(0), c, c, groups));
  if (attention) {
    const Weights::Scope a = s.sub("attentions").sub(0);
    AutoencoderKL::MidAttention at;
    at.norm = GetNorm(a.sub("group_norm"), c, groups);
    at.q_w = a.get("to_q.weight", {c, c});
    at.q_b = a.get("to_q.bias", {c});
    at.k_w = a.get("to_k.weight", {c, c});
    at.k_b = a.get("to_k.bias", {c});
    at.v_w = a.get("to_v.weight", {c, c});
    at.v_b = a.get("to_v.bias", {c});
    at.o_w = a.get("to_out.0.weight", {c, c});
    at.o_b = a.get("to_out.0.bias", {c});
    m.attention = at;
  }
  m.resnets.push_back(GetResnet(s.sub("resnets").sub(1), c, c, groups));
  return m;
}

void RequireImage(const at::Tensor& t, int64_t channels, const char* what) {
  Require(t.defined() && t.dim() == 4, std::string(what) + " must be a 4-D tensor [batch, channels, height, width]");
  Require(t.size(1) == channels, std::string(what) + " must have " + std::to_string(channels) + " channels, not " +
                                     std::to_string(t.size(1)));
  Require(at::isFloatingType(t.scalar_type()), std::string(what) + " must be floating-point");
  Require(t.size(2) > 0 && t.size(3) > 0, std::string(what) + " must not be empty");
}

// diffusers' blend_v / blend_h: the first `extent` rows (columns) of b fade in from the last ones of a.
// Written into b in place, as diffusers does (later blends read the blended tiles).
void Blend(const at::Tensor& a, at::Tensor& b, int64_t extent, int64_t dim) {
  extent = std::min({a.size(dim), b.size(dim), extent});
  if (extent <= 0) return;
  std::vector<double> wb(extent), wa(extent);
  for (int64_t i = 0; i < extent; ++i) {
    wb[i] = static_cast<double>(i) / static_cast<double>(extent);
    wa[i] = 1.0 - wb[i];
  }
  std::vector<int64_t> shape(4, 1);
  shape[dim] = extent;
  auto opts = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor ta = at::tensor(wa, opts).view(shape).to(b.device(), b.scalar_type());
  const at::Tensor tb = at::tensor(wb, opts).view(shape).to(b.device(), b.scalar_type());
  const at::Tensor tail = a.narrow(dim, a.size(dim) - extent, extent);
  at::Tensor head = b.narrow(dim, 0, extent);
  head.copy_(tail * ta + head * tb);
}

}  // namespace

AutoencoderKLConfig AutoencoderKLConfig::Read(ConfigReader& r) {
  AutoencoderKLConfig c;
  c.in_channels = r.Int("in_channels", c.in_channels);
  c.out_channels = r.Int("out_channels", c.out_channels);
  c.latent_channels = r.Int("latent_channels", c.latent_channels);
  c.block_out_channels = r.Ints("block_out_channels", c.block_out_channels);
  const int n = static_cast<int>(c.block_out_channels.size());
  if (n == 0) r.Fail("block_out_channels", "must list at least one block");
  const std::vector<std::string> down = r.Strings("down_block_types", {"DownEncoderBlock2D"});
  const std::vector<std::string> up = r.Strings("up_block_types", {"UpDecoderBlock2D"});
  if (static_cast<int>(down.size()) != n)
    r.Fail("down_block_types", "must have one entry per block_out_channels entry (" + std::to_string(n) + ")");
  if (static_cast<int>(up.size()) != n)
    r.Fail("up_block_types", "must have one entry per block_out_channels entry (" + std::to_string(n) + ")");
  for (const auto& t : down)
    if (t != "DownEncoderBlock2D") r.Fail("down_block_types", "\"" + t + "\" is not supported (DownEncoderBlock2D)");
  for (const auto& t : up)
    if (t != "UpDecoderBlock2D") r.Fail("up_block_types", "\"" + t + "\" is not supported (UpDecoderBlock2D)");
  c.layers_per_block = r.Int("layers_per_block", c.layers_per_block);
  c.norm_num_groups = r.Int("norm_num_groups", c.norm_num_groups);
  c.sample_size = r.Int("sample_size", c.sample_size);
  c.scaling_factor = r.Double("scaling_factor", c.scaling_factor);
  c.force_upcast = r.Bool("force_upcast", c.force_upcast);
  c.use_quant_conv = r.Bool("use_quant_conv", c.use_quant_conv);
  c.use_post_quant_conv = r.Bool("use_post_quant_conv", c.use_post_quant_conv);
  c.mid_block_add_attention = r.Bool("mid_block_add_attention", c.mid_block_add_attention);
  r.Expect("act_fn", "\"silu\"", "the VAE is implemented with SiLU");
  r.Expect("shift_factor", "null", "latent shifting (SD3/Flux VAEs) is not implemented");
  r.Expect("latents_mean", "null", "per-channel latent statistics (SDXL-style configs) are not implemented");
  r.Expect("latents_std", "null", "per-channel latent statistics (SDXL-style configs) are not implemented");

  auto positive = [&](const char* key, int v) {
    if (v <= 0) r.Fail(key, "must be positive");
  };
  positive("in_channels", c.in_channels);
  positive("out_channels", c.out_channels);
  positive("latent_channels", c.latent_channels);
  positive("layers_per_block", c.layers_per_block);
  positive("norm_num_groups", c.norm_num_groups);
  positive("sample_size", c.sample_size);
  for (int ch : c.block_out_channels)
    if (ch <= 0 || ch % c.norm_num_groups != 0)
      r.Fail("block_out_channels", "every entry must be a positive multiple of norm_num_groups (" +
                                       std::to_string(c.norm_num_groups) + ")");
  if (!(c.scaling_factor > 0)) r.Fail("scaling_factor", "must be positive");
  return c;
}

at::Tensor AutoencoderKL::Conv::operator()(const at::Tensor& x) const {
  // For CPU float32, ATen sends a convolution with batch 1 and a small input (≤ 20480 elements, e.g.
  // conv_in on a 64×64 latent) to its native kernel and the same convolution with batch > 1 to oneDNN;
  // their roundings differ by ~1e-6, so a sliced decode would not equal the batched one. Calling oneDNN
  // for every such convolution makes an image's result independent of the batch it is decoded in.
  // (The VAE is never trained, so this inference-only path needs no gradient.)
  if (x.is_cpu() && x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat && at::hasMKLDNN() &&
      !at::GradMode::is_enabled())
    return at::mkldnn_convolution(x.contiguous(), w, b, {padding, padding}, {stride, stride}, {1, 1}, 1);
  return at::conv2d(x, w, b, {stride, stride}, {padding, padding});
}

at::Tensor AutoencoderKL::Norm::operator()(const at::Tensor& x) const {
  return at::group_norm(x, groups, w, b, kNormEps);
}

at::Tensor AutoencoderKL::Resnet::operator()(const at::Tensor& x) const {
  at::Tensor h = conv1(at::silu(norm1(x)));
  h = conv2(at::silu(norm2(h)));  // dropout is 0
  return (shortcut ? (*shortcut)(x) : x) + h;
}

at::Tensor AutoencoderKL::MidAttention::operator()(const at::Tensor& x) const {
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  // [B, C, H, W] → [B, 1 head, H·W tokens, C]; the single head spans all channels (scale C^-0.5).
  const at::Tensor h = norm(x).view({B, C, H * W}).transpose(1, 2);
  const at::Tensor q = at::linear(h, q_w, q_b).unsqueeze(1);
  const at::Tensor k = at::linear(h, k_w, k_b).unsqueeze(1);
  const at::Tensor v = at::linear(h, v_w, v_b).unsqueeze(1);
  at::Tensor a = at::scaled_dot_product_attention(q, k, v).squeeze(1);
  a = at::linear(a, o_w, o_b);
  // Contiguous on purpose: reshaping the transposed tokens gives a channels-last view, and the add and
  // the next GroupNorm would then take a layout that depends on the batch size (batch 1 is ambiguous),
  // so a sliced decode would round differently from the batched one.
  return a.transpose(1, 2).contiguous().view({B, C, H, W}) + x;  // residual_connection, rescale 1
}

at::Tensor AutoencoderKL::MidBlock::operator()(const at::Tensor& x) const {
  at::Tensor h = resnets[0](x);
  if (attention) h = (*attention)(h);
  return resnets[1](h);
}

AutoencoderKL::AutoencoderKL(const AutoencoderKLConfig& config, Weights weights)
    : config_(config), weights_(RenameDeprecatedAttention(std::move(weights))) {
  const auto& ch = config_.block_out_channels;
  const int n = static_cast<int>(ch.size());
  const int64_t g = config_.norm_num_groups, L = config_.latent_channels;
  Weights::Scope root = weights_.root();

  Weights::Scope enc = root.sub("encoder");
  enc_conv_in_ = GetConv(enc.sub("conv_in"), config_.in_channels, ch[0], 3, 1, 1);
  int64_t prev = ch[0];
  for (int i = 0; i < n; ++i) {
    Weights::Scope s = enc.sub("down_blocks").sub(i);
    EncoderBlock b;
    for (int j = 0; j < config_.layers_per_block; ++j) {
      b.resnets.push_back(GetResnet(s.sub("resnets").sub(j), j == 0 ? prev : ch[i], ch[i], g));
    }
    if (i != n - 1) b.downsample = GetConv(s.sub("downsamplers").sub(0).sub("conv"), ch[i], ch[i], 3, 2, 0);
    enc_blocks_.push_back(std::move(b));
    prev = ch[i];
  }
  enc_mid_ = GetMid(enc.sub("mid_block"), ch[n - 1], g, config_.mid_block_add_attention);
  enc_norm_out_ = GetNorm(enc.sub("conv_norm_out"), ch[n - 1], g);
  enc_conv_out_ = GetConv(enc.sub("conv_out"), ch[n - 1], 2 * L, 3, 1, 1);
  if (config_.use_quant_conv) quant_conv_ = GetConv(root.sub("quant_conv"), 2 * L, 2 * L, 1, 1, 0);
  if (config_.use_post_quant_conv) post_quant_conv_ = GetConv(root.sub("post_quant_conv"), L, L, 1, 1, 0);

  Weights::Scope dec = root.sub("decoder");
  dec_conv_in_ = GetConv(dec.sub("conv_in"), L, ch[n - 1], 3, 1, 1);
  dec_mid_ = GetMid(dec.sub("mid_block"), ch[n - 1], g, config_.mid_block_add_attention);
  prev = ch[n - 1];
  for (int i = 0; i < n; ++i) {
    const int64_t out = ch[n - 1 - i];
    Weights::Scope s = dec.sub("up_blocks").sub(i);
    DecoderBlock b;
    for (int j = 0; j < config_.layers_per_block + 1; ++j) {
      b.resnets.push_back(GetResnet(s.sub("resnets").sub(j), j == 0 ? prev : out, out, g));
    }
    if (i != n - 1) b.upsample = GetConv(s.sub("upsamplers").sub(0).sub("conv"), out, out, 3, 1, 1);
    dec_blocks_.push_back(std::move(b));
    prev = out;
  }
  dec_norm_out_ = GetNorm(dec.sub("conv_norm_out"), ch[0], g);
  dec_conv_out_ = GetConv(dec.sub("conv_out"), ch[0], config_.out_channels, 3, 1, 1);
  weights_.Finish();

  dtype_ = enc_conv_in_.w.scalar_type();
  device_ = enc_conv_in_.w.device();
}

std::shared_ptr<AutoencoderKL> AutoencoderKL::Load(const std::string& configText, const std::string& configFile,
                                                   const std::vector<std::string>& weightFiles, at::ScalarType dtype,
                                                   c10::Device device) {
  ConfigReader reader(configText, configFile);
  AutoencoderKLConfig config = AutoencoderKLConfig::Read(reader);
  reader.Finish();
  return std::make_shared<AutoencoderKL>(config, Weights::FromFiles(weightFiles, dtype, device));
}

at::Tensor AutoencoderKL::EncodeOne(const at::Tensor& x) const {
  at::Tensor h = enc_conv_in_(x);
  for (const auto& b : enc_blocks_) {
    for (const auto& r : b.resnets) h = r(h);
    // Asymmetric padding (right and bottom only), then a stride-2 conv without padding.
    if (b.downsample) h = (*b.downsample)(at::constant_pad_nd(h, {0, 1, 0, 1}, 0));
  }
  h = enc_mid_(h);
  h = enc_conv_out_(at::silu(enc_norm_out_(h)));
  if (quant_conv_) h = (*quant_conv_)(h);
  return h;
}

at::Tensor AutoencoderKL::DecodeOne(const at::Tensor& z) const {
  at::Tensor h = post_quant_conv_ ? (*post_quant_conv_)(z) : z;
  h = dec_conv_in_(h);
  h = dec_mid_(h);
  for (const auto& b : dec_blocks_) {
    for (const auto& r : b.resnets) h = r(h);
    if (b.upsample) h = (*b.upsample)(at::upsample_nearest2d(h, {2 * h.size(2), 2 * h.size(3)}));
  }
  return dec_conv_out_(at::silu(dec_norm_out_(h)));
}

AutoencoderKL::Posterior AutoencoderKL::Encode(const at::Tensor& images, bool slice, const Progress* progress) const {
  RequireImage(images, config_.in_channels, "images");
  const at::Tensor x = images.to(device_, dtype_);
  at::Tensor moments;
  if (slice && x.size(0) > 1) {
    std::vector<at::Tensor> parts;
    for (const at::Tensor& one : x.split(1)) {
      if (progress) progress->ThrowIfCancelled();
      parts.push_back(EncodeOne(one));
    }
    moments = at::cat(parts);
  } else {
    moments = EncodeOne(x);
  }
  const auto halves = moments.chunk(2, 1);
  Posterior p;
  p.mean = halves[0];
  p.logvar = at::clamp(halves[1], -30.0, 20.0);
  p.std = at::exp(p.logvar * 0.5);
  return p;
}

at::Tensor AutoencoderKL::Sample(const Posterior& p, const at::Tensor& noise, std::optional<at::Generator> generator) {
  at::Tensor eps;
  if (noise.defined()) {
    Require(noise.sizes() == p.mean.sizes(), "noise must have the posterior's shape");
    eps = noise.to(p.mean.device(), p.mean.scalar_type());
  } else if (generator) {
    if (generator->device().is_cuda() && !p.mean.device().is_cuda())
      throw Error("INVALID_ARGUMENT", "A CUDA generator cannot draw noise for a posterior on the CPU");
    eps = at::randn(p.mean.sizes(), generator, p.mean.options().device(generator->device())).to(p.mean.device());
  } else {
    eps = at::randn(p.mean.sizes(), p.mean.options());
  }
  return p.mean + p.std * eps;
}

at::Tensor AutoencoderKL::TiledDecode(const at::Tensor& z, const Progress* progress) const {
  const int64_t tile_latent = tile_latent_size(), tile_sample = tile_sample_size();
  // The same integer arithmetic as diffusers (tile_overlap_factor 0.25).
  const int64_t overlap = static_cast<int64_t>(tile_latent * (1 - 0.25));
  const int64_t blend = static_cast<int64_t>(tile_sample * 0.25);
  const int64_t limit = tile_sample - blend;
  Require(overlap > 0, "The VAE's sample_size is too small for tiled decoding");
  std::vector<std::vector<at::Tensor>> rows;
  for (int64_t i = 0; i < z.size(2); i += overlap) {
    std::vector<at::Tensor> row;
    for (int64_t j = 0; j < z.size(3); j += overlap) {
      if (progress) progress->ThrowIfCancelled();
      const at::Tensor t = z.narrow(2, i, std::min(tile_latent, z.size(2) - i))
                               .narrow(3, j, std::min(tile_latent, z.size(3) - j));
      row.push_back(DecodeOne(t));
    }
    rows.push_back(std::move(row));
  }
  std::vector<at::Tensor> out_rows;
  for (size_t i = 0; i < rows.size(); ++i) {
    std::vector<at::Tensor> parts;
    for (size_t j = 0; j < rows[i].size(); ++j) {
      at::Tensor& t = rows[i][j];
      if (i > 0) Blend(rows[i - 1][j], t, blend, 2);
      if (j > 0) Blend(rows[i][j - 1], t, blend, 3);
      parts.push_back(t.narrow(2, 0, std::min(limit, t.size(2))).narrow(3, 0, std::min(limit, t.size(3))));
    }
    out_rows.push_back(at::cat(parts, 3));
  }
  return at::cat(out_rows, 2);
}

at::Tensor AutoencoderKL::Decode(const at::Tensor& latents, bool slice, bool tile, const Progress* progress) const {
  RequireImage(latents, config_.latent_channels, "latents");
  const at::Tensor z = latents.to(device_, dtype_);
  auto one = [&](const at::Tensor& x) {
    const bool tiled = tile && (x.size(2) > tile_latent_size() || x.size(3) > tile_latent_size());
    return tiled ? TiledDecode(x, progress) : DecodeOne(x);
  };
  if (slice && z.size(0) > 1) {
    std::vector<at::Tensor> parts;
    for (const at::Tensor& x : z.split(1)) {
      if (progress) progress->ThrowIfCancelled();
      parts.push_back(one(x));
    }
    return at::cat(parts);
  }
  return one(z);
}

}  // namespace cd::models
