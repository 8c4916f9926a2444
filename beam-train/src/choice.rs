//! A benchmark-style task metric: multiple-choice continuation on held-out text.
//!
//! Each held-out verse (one per line) is cut at the word boundaries nearest one third and two
//! thirds of its length, giving two items: the verse up to the cut is the context, the rest of it
//! the true ending, and the endings of `choices − 1` other items (drawn with a fixed seed) are the
//! distractors. The model picks the ending with the highest mean log-likelihood per token given
//! the context (length-normalised, so short endings are not favoured); accuracy is the fraction of
//! items where that is the true one. Chance is `1 / choices`.

use beam_model::model::{HiddenStates, MaskMode, MoeLm};
use beam_model::MoeBackend;
use burn::tensor::{Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::data::splitmix64;
use crate::error::TrainError;
use crate::eval::token_losses;

/// One multiple-choice item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChoiceItem {
    /// Token ids of the context.
    pub context: Vec<u32>,
    /// Token ids of each candidate ending.
    pub endings: Vec<Vec<u32>>,
    /// Index of the true ending in `endings`.
    pub answer: usize,
}

/// How items are drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChoiceOptions {
    /// Candidate endings per item (the true one included).
    pub choices: usize,
    /// Seed of the distractors and the answer positions.
    pub seed: u64,
    /// At most this many items (the first ones, in text order).
    pub max_items: Option<usize>,
    /// Candidate sequences per forward.
    pub batch_size: usize,
    /// Longest context + ending in tokens (the model's context): items that would not fit, and
    /// distractors that would not fit a given context, are left out.
    pub max_len: Option<usize>,
}

impl Default for ChoiceOptions {
    fn default() -> Self {
        Self {
            choices: 4,
            seed: 2026,
            max_items: Some(2000),
            batch_size: 32,
            max_len: None,
        }
    }
}

/// Accuracy of one model variant on the items.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChoiceReport {
    /// Items scored.
    pub items: usize,
    /// Candidates per item.
    pub choices: usize,
    /// Fraction of items whose true ending scored highest.
    pub accuracy: f64,
}

/// `(context, ending)` texts of a verse cut at the word boundaries nearest 1/3 and 2/3 of its
/// characters, each side keeping at least two words; fewer for short verses.
fn cuts(verse: &str) -> Vec<(String, String)> {
    let words: Vec<&str> = verse.split_whitespace().collect();
    if words.len() < 4 {
        return Vec::new();
    }
    let total: usize = words.iter().map(|w| w.len() + 1).sum();
    let mut out = Vec::new();
    for fraction in [1.0 / 3.0, 2.0 / 3.0] {
        let target = fraction * total as f64;
        let mut best = 2;
        let mut best_gap = f64::INFINITY;
        let mut chars = 0usize;
        for (i, w) in words.iter().enumerate() {
            chars += w.len() + 1;
            let cut = i + 1;
            if (2..=words.len() - 2).contains(&cut) && (chars as f64 - target).abs() < best_gap {
                best_gap = (chars as f64 - target).abs();
                best = cut;
            }
        }
        let pair = (
            words[..best].join(" "),
            format!(" {}", words[best..].join(" ")),
        );
        if !out.contains(&pair) {
            out.push(pair);
        }
    }
    out
}

/// The items of `text` (one verse per line), tokenised with `tokenizer`.
pub fn choice_items(
    text: &str,
    tokenizer: &tokenizers::Tokenizer,
    options: &ChoiceOptions,
) -> Result<Vec<ChoiceItem>, TrainError> {
    if options.choices < 2 || options.batch_size == 0 || options.max_items == Some(0) {
        return Err(TrainError::Config(format!(
            "choices ({}) must be at least 2, batch_size ({}) and max_items ({:?}) positive",
            options.choices, options.batch_size, options.max_items
        )));
    }
    let encode = |s: &str| -> Result<Vec<u32>, TrainError> {
        tokenizer
            .encode(s, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| TrainError::Tokenizer {
                path: "tokenizer.json".into(),
                reason: e.to_string(),
            })
    };
    let mut pairs = Vec::new();
    for verse in text.lines() {
        for (context, ending) in cuts(verse) {
            let (context, ending) = (encode(&context)?, encode(&ending)?);
            if !context.is_empty() && !ending.is_empty() {
                pairs.push((context, ending));
            }
        }
    }
    if pairs.len() < options.choices {
        return Err(TrainError::Config(format!(
            "the text gives {} items, fewer than the {} choices per item",
            pairs.len(),
            options.choices
        )));
    }
    let fits = |context: &[u32], ending: &[u32]| {
        options
            .max_len
            .is_none_or(|max| context.len() + ending.len() <= max)
    };
    let count = options.max_items.unwrap_or(usize::MAX);
    let mut state = options.seed;
    let mut items = Vec::new();
    for (index, (context, ending)) in pairs.iter().enumerate() {
        if items.len() == count {
            break;
        }
        if !fits(context, ending) {
            continue;
        }
        // Distractors: endings of other items, distinct from the true one and from each other,
        // that fit after this context (an item that cannot get enough is left out).
        let mut endings = vec![ending.clone()];
        for _ in 0..64 * options.choices {
            if endings.len() == options.choices {
                break;
            }
            let other = (splitmix64(&mut state) % pairs.len() as u64) as usize;
            let candidate = &pairs[other].1;
            if other != index && !endings.contains(candidate) && fits(context, candidate) {
                endings.push(candidate.clone());
            }
        }
        if endings.len() < options.choices {
            continue;
        }
        let answer = (splitmix64(&mut state) % options.choices as u64) as usize;
        endings.swap(0, answer);
        items.push(ChoiceItem {
            context: context.clone(),
            endings,
            answer,
        });
    }
    if items.is_empty() {
        return Err(TrainError::Config(format!(
            "no multiple-choice item fits {} tokens",
            options.max_len.unwrap_or_default()
        )));
    }
    Ok(items)
}

/// Mean log-likelihood per token of each `(context, ending)` sequence's ending, in order.
/// Sequences are batched by length (little padding) and right-padded (causal attention: padding
/// after a sequence does not change its logits).
pub fn ending_scores<B: MoeBackend>(
    model: &MoeLm<B>,
    sequences: &[(&[u32], &[u32])],
    mode: MaskMode,
    batch_size: usize,
) -> Vec<f64> {
    let mut order: Vec<usize> = (0..sequences.len()).collect();
    order.sort_by_key(|&i| sequences[i].0.len() + sequences[i].1.len());
    let sorted: Vec<(&[u32], &[u32])> = order.iter().map(|&i| sequences[i]).collect();
    let mut scores = vec![0.0; sequences.len()];
    for (&i, score) in order
        .iter()
        .zip(padded_scores(model, &sorted, mode, batch_size))
    {
        scores[i] = score;
    }
    scores
}

/// [`ending_scores`] in the given order, `batch_size` sequences per forward.
fn padded_scores<B: MoeBackend>(
    model: &MoeLm<B>,
    sequences: &[(&[u32], &[u32])],
    mode: MaskMode,
    batch_size: usize,
) -> Vec<f64> {
    let device = model.embed.weight.device();
    let mut scores = Vec::with_capacity(sequences.len());
    for chunk in sequences.chunks(batch_size.max(1)) {
        // Inputs: context + ending without its last token; targets: the next tokens.
        let len = chunk
            .iter()
            .map(|(c, e)| c.len() + e.len() - 1)
            .max()
            .unwrap_or(1);
        let mut inputs = vec![0i64; chunk.len() * len];
        let mut targets = vec![0i64; chunk.len() * len];
        for (row, (context, ending)) in chunk.iter().enumerate() {
            let tokens: Vec<u32> = context.iter().chain(ending.iter()).copied().collect();
            for t in 0..tokens.len() - 1 {
                inputs[row * len + t] = tokens[t] as i64;
                targets[row * len + t] = tokens[t + 1] as i64;
            }
        }
        let shape = [chunk.len(), len];
        let inputs = Tensor::<B, 2, Int>::from_data(TensorData::new(inputs, shape), &device);
        let targets = Tensor::<B, 2, Int>::from_data(TensorData::new(targets, shape), &device);
        let logits = model.forward(inputs, None, mode, HiddenStates::Skip).logits;
        let (nll, _) = token_losses(logits, targets);
        let nll: Vec<f64> = nll
            .into_data()
            .convert::<f64>()
            .to_vec::<f64>()
            .expect("f64 data");
        for (row, (context, ending)) in chunk.iter().enumerate() {
            // Position t predicts token t + 1: the ending's tokens are predicted from
            // positions context.len() − 1 … context.len() + ending.len() − 2.
            let first = row * len + context.len() - 1;
            let sum: f64 = nll[first..first + ending.len()].iter().sum();
            scores.push(-sum / ending.len() as f64);
        }
    }
    scores
}

/// Multiple-choice accuracy of `model` with mask `mode` on `items`.
pub fn evaluate_choice<B: MoeBackend>(
    model: &MoeLm<B>,
    items: &[ChoiceItem],
    mode: MaskMode,
    batch_size: usize,
) -> Result<ChoiceReport, TrainError> {
    let choices = items.first().map_or(0, |i| i.endings.len());
    if items.is_empty() || items.iter().any(|i| i.endings.len() != choices) {
        return Err(TrainError::Config(
            "multiple-choice items must be non-empty with the same number of endings".into(),
        ));
    }
    if let Some(context) = model.config().max_position_embeddings {
        if let Some(long) = items
            .iter()
            .flat_map(|i| i.endings.iter().map(move |e| i.context.len() + e.len()))
            .find(|&l| l > context)
        {
            return Err(TrainError::Config(format!(
                "a multiple-choice item has {long} tokens, more than the model's context of {context}"
            )));
        }
    }
    let sequences: Vec<(&[u32], &[u32])> = items
        .iter()
        .flat_map(|i| i.endings.iter().map(move |e| (&i.context[..], &e[..])))
        .collect();
    let scores = ending_scores(model, &sequences, mode, batch_size);
    let correct = items
        .iter()
        .zip(scores.chunks(choices))
        .filter(|(item, s)| {
            // Ties go to the first candidate (answer positions are random: no one is favoured).
            let best = (0..s.len()).fold(0, |b, j| if s[j] > s[b] { j } else { b });
            best == item.answer
        })
        .count();
    Ok(ChoiceReport {
        items: items.len(),
        choices,
        accuracy: correct as f64 / items.len() as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verses_are_cut_near_a_third_and_two_thirds_with_two_words_each_side() {
        let cuts = cuts("And God said, Let there be light: and there was light.");
        assert_eq!(cuts.len(), 2);
        // Word lengths + 1: 4 4 6 4 6 3 7 4 6 4 7 (55); cumulative 18 is nearest 55/3, 38 nearest
        // 2·55/3.
        assert_eq!(cuts[0].0, "And God said, Let");
        assert_eq!(cuts[0].1, " there be light: and there was light.");
        assert_eq!(cuts[1].0, "And God said, Let there be light: and");
        assert_eq!(cuts[1].1, " there was light.");
        for (context, ending) in &cuts {
            assert!(context.split_whitespace().count() >= 2);
            assert!(ending.split_whitespace().count() >= 2);
        }
        assert!(super::cuts("Jesus wept.").is_empty());
    }
}
