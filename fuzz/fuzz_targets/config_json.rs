//! `config.json` parsing and validation never panic, whatever the bytes.
#![no_main]

use std::path::Path;

use beam_model::model::config::{HfConfig, ModelConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let path = Path::new("config.json");
    if let Ok(hf) = HfConfig::parse(text, path) {
        if let Ok(config) = ModelConfig::from_hf(&hf, path) {
            // Accepted configs are consistent enough to size a model.
            let _ = config.parameters();
            assert_eq!(config.moe_layers.len(), config.num_layers);
        }
    }
});
