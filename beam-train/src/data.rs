//! Token streams for training and evaluation: a text corpus (plain or gzip) encoded with the
//! model's `tokenizer.json`, sampled as random windows for training and cut into fixed,
//! non-overlapping windows for evaluation.

use std::io::Read;
use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use crate::error::{io_error, TrainError};

/// A tokenised corpus.
#[derive(Debug, Clone)]
pub struct TokenData {
    /// Token ids in text order.
    pub tokens: Vec<u32>,
    /// Where they came from (for error messages).
    pub source: PathBuf,
}

/// One batch of next-token prediction windows.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Input ids, `batch × seq_len`, row-major.
    pub inputs: Vec<i64>,
    /// Target ids (inputs shifted by one), same layout.
    pub targets: Vec<i64>,
    /// Rows.
    pub batch_size: usize,
    /// Columns.
    pub seq_len: usize,
}

impl Batch {
    /// Inputs and targets as `[batch, seq]` int tensors.
    pub fn tensors<B: Backend>(
        &self,
        device: &B::Device,
    ) -> (Tensor<B, 2, Int>, Tensor<B, 2, Int>) {
        let shape = [self.batch_size, self.seq_len];
        let make = |v: &Vec<i64>| {
            Tensor::<B, 2, Int>::from_data(TensorData::new(v.clone(), shape), device)
        };
        (make(&self.inputs), make(&self.targets))
    }
}

/// Reads a text file, gunzipping it when its name ends in `.gz`.
pub fn read_text(path: &Path) -> Result<String, TrainError> {
    let bytes = std::fs::read(path).map_err(io_error(path))?;
    if path.extension().is_some_and(|e| e == "gz") {
        let mut text = String::new();
        flate2::read::GzDecoder::new(&bytes[..])
            .read_to_string(&mut text)
            .map_err(io_error(path))?;
        Ok(text)
    } else {
        String::from_utf8(bytes).map_err(|e| TrainError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })
    }
}

/// Loads `tokenizer.json`.
pub fn load_tokenizer(path: &Path) -> Result<tokenizers::Tokenizer, TrainError> {
    tokenizers::Tokenizer::from_file(path).map_err(|e| TrainError::Tokenizer {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

impl TokenData {
    /// Encodes the text file at `corpus` (plain or `.gz`) with the tokenizer at `tokenizer`,
    /// checking every id against the model's vocabulary size.
    pub fn from_file(
        corpus: &Path,
        tokenizer: &Path,
        vocab_size: usize,
    ) -> Result<Self, TrainError> {
        let text = read_text(corpus)?;
        let tok = load_tokenizer(tokenizer)?;
        let encoding = tok
            .encode(text.as_str(), false)
            .map_err(|e| TrainError::Tokenizer {
                path: tokenizer.to_path_buf(),
                reason: e.to_string(),
            })?;
        Self::from_tokens(encoding.get_ids().to_vec(), corpus, vocab_size)
    }

    /// Wraps already encoded ids, checking them against the vocabulary size.
    pub fn from_tokens(
        tokens: Vec<u32>,
        source: &Path,
        vocab_size: usize,
    ) -> Result<Self, TrainError> {
        if let Some(&id) = tokens.iter().find(|&&id| id as usize >= vocab_size) {
            return Err(TrainError::TokenOutOfVocabulary {
                path: source.to_path_buf(),
                id,
                vocab: vocab_size,
            });
        }
        Ok(Self {
            tokens,
            source: source.to_path_buf(),
        })
    }

    fn check_len(&self, seq_len: usize) -> Result<(), TrainError> {
        if self.tokens.len() <= seq_len {
            return Err(TrainError::CorpusTooShort {
                path: self.source.clone(),
                tokens: self.tokens.len(),
                needed: seq_len + 1,
            });
        }
        Ok(())
    }

    /// The training batch of `step`: `batch_size` windows at random offsets drawn from
    /// `(seed, step)` alone, so a resumed run sees exactly the batches an uninterrupted one would.
    pub fn train_batch(
        &self,
        seed: u64,
        step: usize,
        batch_size: usize,
        seq_len: usize,
    ) -> Result<Batch, TrainError> {
        self.check_len(seq_len)?;
        let starts = self.tokens.len() - seq_len;
        let mut state = seed ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let offsets = (0..batch_size)
            .map(|_| (splitmix64(&mut state) % starts as u64) as usize)
            .collect::<Vec<_>>();
        Ok(self.windows(&offsets, seq_len))
    }

    /// Consecutive non-overlapping windows covering the first `max_tokens` predicted tokens (all
    /// of the corpus when `None`), grouped in batches of `batch_size` (the last may be smaller).
    pub fn eval_batches(
        &self,
        seq_len: usize,
        batch_size: usize,
        max_tokens: Option<usize>,
    ) -> Result<Vec<Batch>, TrainError> {
        if seq_len == 0 || batch_size == 0 || max_tokens == Some(0) {
            return Err(TrainError::Config(format!(
                "seq_len ({seq_len}), batch_size ({batch_size}) and max_tokens ({}) must be positive",
                max_tokens.map_or("all".to_string(), |m| m.to_string())
            )));
        }
        self.check_len(seq_len)?;
        let mut windows = (self.tokens.len() - 1) / seq_len;
        if let Some(max) = max_tokens {
            windows = windows.min(max.div_ceil(seq_len)).max(1);
        }
        let offsets = (0..windows).map(|w| w * seq_len).collect::<Vec<_>>();
        Ok(offsets
            .chunks(batch_size.max(1))
            .map(|chunk| self.windows(chunk, seq_len))
            .collect())
    }

    fn windows(&self, offsets: &[usize], seq_len: usize) -> Batch {
        let mut inputs = Vec::with_capacity(offsets.len() * seq_len);
        let mut targets = Vec::with_capacity(offsets.len() * seq_len);
        for &o in offsets {
            inputs.extend(self.tokens[o..o + seq_len].iter().map(|&t| t as i64));
            targets.extend(
                self.tokens[o + 1..o + seq_len + 1]
                    .iter()
                    .map(|&t| t as i64),
            );
        }
        Batch {
            inputs,
            targets,
            batch_size: offsets.len(),
            seq_len,
        }
    }
}

pub(crate) fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: u32) -> TokenData {
        TokenData::from_tokens((0..n).map(|i| i % 50).collect(), Path::new("mem"), 50).unwrap()
    }

    #[test]
    fn train_batches_depend_only_on_seed_and_step() {
        let d = data(1000);
        let a = d.train_batch(7, 3, 4, 16).unwrap();
        assert_eq!(a.inputs, d.train_batch(7, 3, 4, 16).unwrap().inputs);
        assert_ne!(a.inputs, d.train_batch(7, 4, 4, 16).unwrap().inputs);
        assert_ne!(a.inputs, d.train_batch(8, 3, 4, 16).unwrap().inputs);
        // Targets are the inputs shifted by one token.
        for row in 0..4 {
            let i = &a.inputs[row * 16..(row + 1) * 16];
            let t = &a.targets[row * 16..(row + 1) * 16];
            assert_eq!(&i[1..], &t[..15]);
        }
    }

    #[test]
    fn eval_batches_cover_the_corpus_without_overlap() {
        let d = data(101);
        let batches = d.eval_batches(10, 3, None).unwrap();
        let rows: usize = batches.iter().map(|b| b.batch_size).sum();
        assert_eq!(rows, 10);
        assert_eq!(batches.len(), 4);
        assert_eq!(batches[1].inputs[0], 30);
        let limited = d.eval_batches(10, 3, Some(25)).unwrap();
        assert_eq!(limited.iter().map(|b| b.batch_size).sum::<usize>(), 3);
    }

    #[test]
    fn bad_corpora_are_typed_errors() {
        let short = data(10);
        assert!(matches!(
            short.train_batch(0, 0, 1, 10),
            Err(TrainError::CorpusTooShort {
                tokens: 10,
                needed: 11,
                ..
            })
        ));
        assert!(matches!(
            TokenData::from_tokens(vec![1, 2, 60], Path::new("c.txt"), 50),
            Err(TrainError::TokenOutOfVocabulary {
                id: 60,
                vocab: 50,
                ..
            })
        ));
    }
}
