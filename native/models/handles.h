// The models behind the opaque handles that the model bindings give to JavaScript, for other native
// code that is handed those handles (the Custom Diffusion trainer takes the JS UNet, text encoder and
// VAE of a pipeline). Each function is implemented in the binding file that creates the handle,
// since only it knows the handle's layout and type tag. All throw INVALID_ARGUMENT for a value that
// is not such a handle and DISPOSED for a disposed one; call them on the JS thread.
#pragma once

#include <napi.h>

#include <memory>

namespace cd::models {
class UNet2DConditionModel;
class ClipTextModel;
class AutoencoderKL;
struct CrossAttentionContext;
}  // namespace cd::models

namespace cd {

std::shared_ptr<models::UNet2DConditionModel> UNetFromJs(const Napi::Value& handle);        // bind_unet.cc
std::shared_ptr<models::ClipTextModel> TextEncoderFromJs(const Napi::Value& handle);        // bind_text_encoder.cc
std::shared_ptr<models::AutoencoderKL> VaeFromJs(const Napi::Value& handle);                // bind_vae.cc
// A context of unet.prepareContext (the keys and values it holds, not the JS box).       // bind_unet.cc
std::shared_ptr<const models::CrossAttentionContext> CrossAttentionContextFromJs(const Napi::Value& handle);

}  // namespace cd
