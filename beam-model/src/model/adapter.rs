//! BEAM adapters: the trained mask routers of a model, stored apart from the base checkpoint in
//! their own safetensors file so the base stays untouched.
//!
//! Tensors: `model.layers.{l}.{mlp|block_sparse_moe}.mask_router.weight` `[E or K, H]` (the
//! `[out, in]` layout of a Hugging Face linear layer), `….mask_router.bias` `[E or K]` and, with
//! the routing-weight input, `….mask_router.weight_scale` `[E or K]`, per MoE layer. Metadata:
//! `format = "beam-adapter"`, `threshold`, `shape` (`per_expert` / `per_slot`), `renormalize`,
//! `weight_feature`, `model_type`.

use std::collections::HashMap;
use std::path::Path;

use burn::module::Param;
use burn::tensor::backend::Backend;
use safetensors::tensor::TensorView;
use safetensors::Dtype;

use super::config::ModelConfig;
use super::{ModelError, MoeLm};
use crate::checkpoint::{LoadError, TensorStore};
use crate::config::{check_threshold, BeamMaskConfig, ConfigError, MaskRouterShape};
use crate::layer::BeamMoe;

fn router_prefix(config: &ModelConfig, layer: usize) -> String {
    format!(
        "model.layers.{layer}.{}.mask_router.",
        config.family.moe_block_name()
    )
}

fn moe_layer_indices(config: &ModelConfig) -> Vec<usize> {
    (0..config.num_layers)
        .filter(|&l| config.moe_layers[l])
        .collect()
}

impl<B: Backend> MoeLm<B> {
    /// Puts a fresh BEAM mask router (all masks 1) on every MoE layer.
    ///
    /// # Errors
    /// If `beam` is invalid ([`ConfigError`]).
    pub fn enable_beam(
        self,
        beam: BeamMaskConfig,
        device: &B::Device,
    ) -> Result<Self, ConfigError> {
        beam.validate()?;
        self.try_map_moe_layers(|moe| moe.enable_beam(beam.clone(), device))
    }

    /// Sets the mask threshold τ of every mask router.
    ///
    /// # Errors
    /// [`ConfigError::Threshold`] if `threshold` is not in `(0, 1)`,
    /// [`ConfigError::NoMaskRouter`] if the model has no BEAM adapter.
    pub fn with_threshold(self, threshold: f64) -> Result<Self, ConfigError> {
        check_threshold(threshold)?;
        if !self.has_beam() {
            return Err(ConfigError::NoMaskRouter("a mask threshold"));
        }
        self.try_map_moe_layers(|moe| match moe.mask_router {
            Some(_) => moe.with_threshold(threshold),
            None => Ok(moe),
        })
    }

    fn try_map_moe_layers(
        mut self,
        f: impl Fn(BeamMoe<B>) -> Result<BeamMoe<B>, ConfigError>,
    ) -> Result<Self, ConfigError> {
        self.layers = std::mem::take(&mut self.layers)
            .into_iter()
            .map(|mut layer| {
                layer.feed_forward = layer.feed_forward.try_map_moe(&f)?;
                Ok(layer)
            })
            .collect::<Result<_, ConfigError>>()?;
        Ok(self)
    }

    /// Loads a BEAM adapter written by [`save_beam_adapter`](Self::save_beam_adapter).
    pub fn load_beam_adapter(
        self,
        path: impl AsRef<Path>,
        device: &B::Device,
    ) -> Result<Self, ModelError> {
        let path = path.as_ref();
        let bad = |reason: String| ModelError::Adapter {
            path: path.to_path_buf(),
            reason,
        };
        let store = open_adapter(path, |p| TensorStore::open(p))?;
        let beam = adapter_settings(path, &store, self.config())?;
        let mut model = self
            .enable_beam(beam, device)
            .map_err(|e| bad(e.to_string()))?;
        let h = model.config().hidden_size;
        for l in moe_layer_indices(model.config()) {
            let prefix = router_prefix(model.config(), l);
            let moe = model.layers[l].feed_forward.moe_mut().expect("MoE layer");
            let outputs = moe.config().mask_router_outputs();
            let weight = store.tensor::<B, 2>(&format!("{prefix}weight"), [outputs, h], device)?;
            let bias = store.param(&format!("{prefix}bias"), [outputs], device)?;
            let router = moe.mask_router.as_mut().expect("mask router just enabled");
            router.proj.weight = Param::from_tensor(weight.transpose());
            router.proj.bias = Some(bias);
            if router.weight_scale.is_some() {
                router.weight_scale =
                    Some(store.param(&format!("{prefix}weight_scale"), [outputs], device)?);
            }
        }
        store.check_all_used(|_| false)?;
        Ok(model)
    }

    /// Writes the mask routers of every MoE layer as a BEAM adapter, atomically (a temporary file
    /// in the same folder, then a rename), so an interrupted save never leaves a broken file.
    pub fn save_beam_adapter(&self, path: impl AsRef<Path>) -> Result<(), ModelError> {
        let path = path.as_ref();
        let bad = |reason: String| ModelError::Adapter {
            path: path.to_path_buf(),
            reason,
        };
        let mut tensors: Vec<(String, Vec<u8>, Vec<usize>)> = Vec::new();
        let mut beam = None;
        for l in moe_layer_indices(self.config()) {
            let moe = self.layers[l].feed_forward.moe().expect("MoE layer");
            let (Some(router), Some(settings)) = (&moe.mask_router, &moe.config().beam) else {
                return Err(bad(format!("MoE layer {l} has no mask router")));
            };
            beam = Some(settings.clone());
            let prefix = router_prefix(self.config(), l);
            let weight = router.proj.weight.val().transpose();
            let shape = weight.dims().to_vec();
            tensors.push((
                format!("{prefix}weight"),
                f32_bytes(weight.into_data()),
                shape,
            ));
            let bias = router
                .proj
                .bias
                .as_ref()
                .ok_or_else(|| bad("mask router without bias".into()))?
                .val();
            let shape = bias.dims().to_vec();
            tensors.push((format!("{prefix}bias"), f32_bytes(bias.into_data()), shape));
            if let Some(scale) = &router.weight_scale {
                let scale = scale.val();
                let shape = scale.dims().to_vec();
                tensors.push((
                    format!("{prefix}weight_scale"),
                    f32_bytes(scale.into_data()),
                    shape,
                ));
            }
        }
        let beam = beam.ok_or_else(|| bad("the model has no MoE layer".into()))?;
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .map(|(name, bytes, shape)| {
                let view =
                    TensorView::new(Dtype::F32, shape.clone(), bytes).expect("consistent view");
                (name.clone(), view)
            })
            .collect();
        let shape = match beam.shape {
            MaskRouterShape::PerExpert => "per_expert",
            MaskRouterShape::PerSlot => "per_slot",
        };
        let metadata: HashMap<String, String> = [
            ("format", "beam-adapter".to_string()),
            ("threshold", beam.threshold.to_string()),
            ("shape", shape.to_string()),
            ("renormalize", beam.renormalize.to_string()),
            ("weight_feature", beam.weight_feature.to_string()),
            ("model_type", self.config().family.model_type().to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let bytes =
            safetensors::serialize(views, Some(metadata)).map_err(|e| bad(e.to_string()))?;
        write_atomically(path, &bytes)
    }
}

/// Opens an adapter file with `open` (mapped, or headers only); a missing or unreadable file is
/// [`ModelError::Io`], a malformed one [`ModelError::Adapter`].
fn open_adapter(
    path: &Path,
    open: impl FnOnce(&Path) -> Result<TensorStore, LoadError>,
) -> Result<TensorStore, ModelError> {
    open(path).map_err(|err| match err {
        LoadError::Io { path, source } => ModelError::Io { path, source },
        other => ModelError::Adapter {
            path: path.to_path_buf(),
            reason: other.to_string(),
        },
    })
}

/// The settings in an adapter's header metadata, checked against `config` (format and family).
fn adapter_settings(
    path: &Path,
    store: &TensorStore,
    config: &ModelConfig,
) -> Result<BeamMaskConfig, ModelError> {
    let bad = |reason: String| ModelError::Adapter {
        path: path.to_path_buf(),
        reason,
    };
    let meta = store.metadata().cloned().unwrap_or_default();
    if meta.get("format").map(String::as_str) != Some("beam-adapter") {
        return Err(bad(
            "not a BEAM adapter (metadata `format` is not `beam-adapter`)".into(),
        ));
    }
    let family = config.family.model_type();
    if let Some(model_type) = meta.get("model_type").filter(|t| t.as_str() != family) {
        return Err(bad(format!(
            "adapter was trained for `{model_type}`, the model is `{family}`"
        )));
    }
    let shape = match meta.get("shape").map(String::as_str) {
        Some("per_expert") | None => MaskRouterShape::PerExpert,
        Some("per_slot") => MaskRouterShape::PerSlot,
        Some(other) => return Err(bad(format!("unknown mask-router shape `{other}`"))),
    };
    let number = |key: &str, default: f64| -> Result<f64, ModelError> {
        meta.get(key).map_or(Ok(default), |v| {
            v.parse()
                .map_err(|_| bad(format!("metadata `{key}` = `{v}` is not a number")))
        })
    };
    Ok(BeamMaskConfig::new()
        .with_shape(shape)
        .with_threshold(number("threshold", 0.5)?)
        .with_renormalize(meta.get("renormalize").is_some_and(|v| v == "true"))
        // Adapters written before the routing-weight input existed have no such key.
        .with_weight_feature(meta.get("weight_feature").is_some_and(|v| v == "true")))
}

/// Reads an adapter's header (no tensor data) and checks it against a model's config: format,
/// family, settings, and every MoE layer's mask-router tensors present with the right shapes and
/// nothing else. What `beam info --beam-adapter` reports.
///
/// # Errors
/// [`ModelError::Io`] for a missing file, [`ModelError::Adapter`] for one that does not fit.
pub fn read_adapter_header(
    path: impl AsRef<Path>,
    config: &ModelConfig,
) -> Result<BeamMaskConfig, ModelError> {
    let path = path.as_ref();
    let store = open_adapter(path, |p| TensorStore::open_header(p))?;
    let beam = adapter_settings(path, &store, config)?;
    let bad = |reason: String| ModelError::Adapter {
        path: path.to_path_buf(),
        reason,
    };
    beam.validate().map_err(|e| bad(e.to_string()))?;
    let outputs = beam.outputs(config.moe.num_experts, config.moe.top_k);
    for l in moe_layer_indices(config) {
        let prefix = router_prefix(config, l);
        let mut expected = vec![
            ("weight", vec![outputs, config.hidden_size]),
            ("bias", vec![outputs]),
        ];
        if beam.weight_feature {
            expected.push(("weight_scale", vec![outputs]));
        }
        for (tensor, shape) in expected {
            store.check_shape(&format!("{prefix}{tensor}"), &shape)?;
        }
    }
    store.check_all_used(|_| false)?;
    Ok(beam)
}

fn f32_bytes(data: burn::tensor::TensorData) -> Vec<u8> {
    data.convert::<f32>()
        .to_vec::<f32>()
        .expect("float data")
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect()
}

/// Writes `bytes` to a temporary sibling of `path`, syncs it, then renames it over `path`.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), ModelError> {
    use std::io::Write;
    let io = |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file_name = path.file_name().ok_or_else(|| {
        io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a file path",
        ))
    })?;
    let tmp = path.with_file_name(format!(
        ".{}.tmp-{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        std::fs::remove_file(&tmp).ok();
    }
    result.map_err(io)
}
