//! A token map: held-out text as HTML, each token coloured by how many experts it kept (averaged
//! over MoE layers), with the count in every layer on hover, so users see which tokens a BEAM
//! mask finds easy.

use std::fmt::Write as _;
use std::path::Path;

use beam_model::model::generate::ids_tensor;
use beam_model::model::{HiddenStates, MaskMode, MoeLm};
use beam_model::MoeBackend;

use crate::data::TokenData;
use crate::error::TrainError;

/// What [`token_map`] covers.
#[derive(Debug, Clone)]
pub struct TokenMapOptions {
    /// Tokens shown, from the start of the held-out text.
    pub tokens: usize,
    /// Tokens per forward window (the context each token sees).
    pub seq_len: usize,
    /// The variant's name, shown in the page title.
    pub label: String,
}

impl Default for TokenMapOptions {
    fn default() -> Self {
        Self {
            tokens: 512,
            seq_len: 256,
            label: "beam".into(),
        }
    }
}

/// One token of the map.
#[derive(Debug, Clone, PartialEq)]
pub struct MappedToken {
    /// The token id.
    pub id: u32,
    /// Experts kept in each MoE layer, in layer order (`0..=K`).
    pub kept: Vec<usize>,
}

impl MappedToken {
    /// Experts kept, averaged over MoE layers.
    pub fn mean_kept(&self) -> f64 {
        self.kept.iter().sum::<usize>() as f64 / self.kept.len().max(1) as f64
    }
}

/// Experts kept per layer for the first `options.tokens` tokens of `data`, run in windows of
/// `options.seq_len` with mask `mode`. Returns the tokens and the router's K.
pub fn token_map<B: MoeBackend>(
    model: &MoeLm<B>,
    mode: MaskMode,
    data: &TokenData,
    options: &TokenMapOptions,
) -> Result<(Vec<MappedToken>, usize), TrainError> {
    if options.tokens == 0 || options.seq_len == 0 {
        return Err(TrainError::Config(format!(
            "token map: tokens ({}) and seq_len ({}) must be positive",
            options.tokens, options.seq_len
        )));
    }
    crate::eval::check_context(options.seq_len, model.config().max_position_embeddings)?;
    let ids = &data.tokens[..options.tokens.min(data.tokens.len())];
    if ids.is_empty() {
        return Err(TrainError::CorpusTooShort {
            path: data.source.clone(),
            tokens: 0,
            needed: 1,
        });
    }
    let device = model.embed.weight.device();
    let top_k = model.top_k();
    let mut mapped = Vec::with_capacity(ids.len());
    for window in ids.chunks(options.seq_len) {
        let inputs = ids_tensor::<B>(window, &device);
        let out = model.forward(inputs, None, mode, HiddenStates::Skip);
        // Per layer: kept experts of each token, `[T]`.
        let per_layer = out
            .routing
            .iter()
            .map(|facts| {
                facts
                    .mask
                    .clone()
                    .sum_dim(2)
                    .into_data()
                    .convert::<f64>()
                    .to_vec::<f64>()
                    .expect("f64 mask counts")
            })
            .collect::<Vec<_>>();
        for (t, &id) in window.iter().enumerate() {
            mapped.push(MappedToken {
                id,
                kept: per_layer.iter().map(|l| l[t].round() as usize).collect(),
            });
        }
    }
    Ok((mapped, top_k))
}

/// The text of each token: the difference between decoding the prefix with and without it, so
/// multi-byte characters split over tokens appear once (on the token that completes them).
fn token_texts(ids: &[u32], tokenizer: &tokenizers::Tokenizer) -> Vec<String> {
    let mut texts = Vec::with_capacity(ids.len());
    let mut previous = String::new();
    for i in 0..ids.len() {
        let decoded = tokenizer.decode(&ids[..=i], false).unwrap_or_default();
        let text = match decoded.strip_prefix(previous.as_str()) {
            Some(rest) => rest.to_string(),
            None => tokenizer.decode(&ids[i..=i], false).unwrap_or_default(),
        };
        previous = decoded;
        texts.push(text);
    }
    texts
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\n' => out.push_str("↵<br>"),
            c => out.push(c),
        }
    }
    out
}

/// Background of a token keeping `fraction` of its K experts: pale green (none) to red (all).
fn colour(fraction: f64) -> String {
    let f = fraction.clamp(0.0, 1.0);
    let mix = |a: f64, b: f64| (a + (b - a) * f).round() as u8;
    format!(
        "#{:02x}{:02x}{:02x}",
        mix(224.0, 239.0),
        mix(243.0, 83.0),
        mix(224.0, 80.0)
    )
}

/// The token map as a self-contained HTML page.
pub fn token_map_html(
    tokens: &[MappedToken],
    top_k: usize,
    tokenizer: &tokenizers::Tokenizer,
    title: &str,
) -> String {
    let ids = tokens.iter().map(|t| t.id).collect::<Vec<_>>();
    let texts = token_texts(&ids, tokenizer);
    let mean = tokens.iter().map(MappedToken::mean_kept).sum::<f64>() / tokens.len().max(1) as f64;
    let mut html = String::new();
    let _ = write!(
        html,
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title>\n<style>\
         body{{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.9}}\
         .t{{white-space:pre-wrap;border-radius:3px;padding:1px 0}}\
         .t:hover{{outline:1px solid #333}}\
         .key span{{display:inline-block;width:2.2em;text-align:center}}</style></head><body>\n\
         <h2>{title}</h2>\n<p>{} tokens, {mean:.2} of {top_k} experts kept per token on average \
         (mean over MoE layers). Hover over a token for the experts it kept in each layer.</p>\n\
         <p class=\"key\">experts kept: ",
        tokens.len(),
        title = escape(title),
    );
    for k in 0..=top_k {
        let _ = write!(
            html,
            "<span style=\"background:{}\">{k}</span>",
            colour(k as f64 / top_k.max(1) as f64)
        );
    }
    html.push_str("</p>\n<p>");
    for (token, text) in tokens.iter().zip(&texts) {
        let layers = token
            .kept
            .iter()
            .enumerate()
            .map(|(l, k)| format!("layer {l}: {k}/{top_k}"))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = write!(
            html,
            "<span class=\"t\" style=\"background:{}\" title=\"{} (token {}): {layers}\">{}</span>",
            colour(token.mean_kept() / top_k.max(1) as f64),
            escape(text.trim()),
            token.id,
            escape(text)
        );
    }
    html.push_str("</p>\n</body></html>\n");
    html
}

/// Runs [`token_map`] and writes its page to `path` (atomically).
pub fn write_token_map<B: MoeBackend>(
    path: &Path,
    model: &MoeLm<B>,
    mode: MaskMode,
    data: &TokenData,
    tokenizer: &tokenizers::Tokenizer,
    options: &TokenMapOptions,
) -> Result<(), TrainError> {
    let (tokens, top_k) = token_map(model, mode, data, options)?;
    let html = token_map_html(
        &tokens,
        top_k,
        tokenizer,
        &format!("Experts kept per token: {}", options.label),
    );
    beam_model::model::adapter::write_atomically(path, html.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colours_run_from_green_to_red_and_clamp() {
        assert_eq!(colour(0.0), "#e0f3e0");
        assert_eq!(colour(1.0), "#ef5350");
        assert_eq!(colour(2.0), colour(1.0));
        assert_ne!(colour(0.5), colour(0.0));
    }

    #[test]
    fn escaping_keeps_markup_out() {
        assert_eq!(escape("a<b>&\"c\"\n"), "a&lt;b&gt;&amp;&quot;c&quot;↵<br>");
    }
}
