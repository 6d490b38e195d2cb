//! Embeddings: [`EmbeddingRequest`] in, [`Embeddings`] out
//! ([`ModelRuntime::embed`](crate::ModelRuntime::embed)).

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The most inputs one [`EmbeddingRequest`] may carry (OpenAI's limit).
pub const MAX_EMBEDDING_INPUTS: usize = 2048;

/// One text to embed: written out, or already tokenized.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EmbeddingInput {
    /// Text, tokenized by the engine with the model's special tokens.
    Text(String),
    /// The model's token ids, sent as they are (no special tokens added).
    Tokens(Vec<u32>),
}

impl EmbeddingInput {
    fn is_empty(&self) -> bool {
        match self {
            Self::Text(text) => text.is_empty(),
            Self::Tokens(tokens) => tokens.is_empty(),
        }
    }
}

impl From<&str> for EmbeddingInput {
    fn from(text: &str) -> Self {
        Self::Text(text.to_owned())
    }
}

impl From<String> for EmbeddingInput {
    fn from(text: String) -> Self {
        Self::Text(text)
    }
}

impl From<Vec<u32>> for EmbeddingInput {
    fn from(tokens: Vec<u32>) -> Self {
        Self::Tokens(tokens)
    }
}

/// A request for one vector per input, in order.
///
/// An input longer than the engine's context (the model's limit unless
/// [`RuntimeConfig::context_size`](crate::RuntimeConfig::context_size)
/// lowers it) is refused with [`Error::ContextExceeded`] unless
/// [`truncate`](Self::truncate) is set; then its tokens are cut to the limit,
/// keeping the special tokens the model puts at each end.
#[derive(Debug, Clone, PartialEq, Default)]
#[non_exhaustive]
pub struct EmbeddingRequest {
    /// The texts, at least one, none empty.
    pub inputs: Vec<EmbeddingInput>,
    /// Cut an input past the limit instead of refusing it.
    pub truncate: bool,
    /// A shorter vector than the model's own; only models trained for it
    /// (Matryoshka) can, and none served here is, so it is refused unless it
    /// equals the model's width.
    pub dimensions: Option<u32>,
}

impl EmbeddingRequest {
    /// A request for `inputs`.
    pub fn new<I: Into<EmbeddingInput>>(inputs: impl IntoIterator<Item = I>) -> Self {
        Self {
            inputs: inputs.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }

    /// Cut inputs past the limit instead of refusing them.
    #[must_use]
    pub fn with_truncate(mut self, truncate: bool) -> Self {
        self.truncate = truncate;
        self
    }

    /// Asks for vectors of `dimensions` entries.
    #[must_use]
    pub fn with_dimensions(mut self, dimensions: u32) -> Self {
        self.dimensions = Some(dimensions);
        self
    }

    /// Checks what can be checked without the model: at least one input, at
    /// most [`MAX_EMBEDDING_INPUTS`], none empty (an empty text has no
    /// meaning to embed; engines would embed their special tokens alone).
    pub fn validate(&self) -> Result<()> {
        if self.inputs.is_empty() {
            return Err(Error::invalid_request(
                "input",
                "is empty; send a text or a list of texts",
            ));
        }
        if self.inputs.len() > MAX_EMBEDDING_INPUTS {
            return Err(Error::invalid_request(
                "input",
                format!(
                    "has {} entries, more than {MAX_EMBEDDING_INPUTS}; split it into several requests",
                    self.inputs.len()
                ),
            ));
        }
        if let Some(index) = self.inputs.iter().position(EmbeddingInput::is_empty) {
            return Err(Error::invalid_request(
                "input",
                format!("entry {index} is empty; every input must have at least one character"),
            ));
        }
        if self.dimensions == Some(0) {
            return Err(Error::invalid_request("dimensions", "must be at least 1"));
        }
        Ok(())
    }

    /// The [`Error`] for [`dimensions`](Self::dimensions) on a model `width`
    /// wide, or `Ok` when it asks for the model's own width (or nothing).
    pub fn check_dimensions(&self, width: usize) -> Result<()> {
        match self.dimensions {
            Some(asked) if asked as usize != width => Err(Error::invalid_request(
                "dimensions",
                format!(
                    "asks for {asked}, but this model gives {width}-dimensional vectors and \
                     was not trained to be shortened; leave `dimensions` out"
                ),
            )),
            _ => Ok(()),
        }
    }
}

/// The vectors of an [`EmbeddingRequest`], one per input in the request's
/// order, pooled as the model says and normalised to unit length (as
/// llama.cpp and vLLM answer `/v1/embeddings`).
#[derive(Debug, Clone, PartialEq, Default)]
#[non_exhaustive]
pub struct Embeddings {
    /// One vector per input.
    pub vectors: Vec<Vec<f32>>,
    /// The tokens read, all inputs together.
    pub prompt_tokens: u64,
}

impl Embeddings {
    /// Vectors and the tokens they were made from.
    pub fn new(vectors: Vec<Vec<f32>>, prompt_tokens: u64) -> Self {
        Self {
            vectors,
            prompt_tokens,
        }
    }
}

/// Cuts `with_special` (an input tokenized with the model's special tokens)
/// to `limit` tokens, keeping the special tokens at each end:
/// `without_special` is the same text's tokens without them, which tells
/// where the specials are. Returns the tokens unchanged when they fit.
pub fn truncate_tokens(with_special: &[u32], without_special: &[u32], limit: usize) -> Vec<u32> {
    if with_special.len() <= limit {
        return with_special.to_vec();
    }
    let Some(prefix) = (0..=with_special.len().saturating_sub(without_special.len()))
        .find(|&start| with_special[start..].starts_with(without_special))
    else {
        // The text's tokens are not a run inside the full ones (a
        // tokenizer that splits them otherwise with its specials): keep the
        // head, which holds the start token.
        return with_special[..limit].to_vec();
    };
    let suffix = with_special
        .len()
        .saturating_sub(prefix + without_special.len());
    let keep = limit.saturating_sub(prefix + suffix);
    let mut cut = Vec::with_capacity(limit);
    cut.extend_from_slice(&with_special[..prefix.min(limit)]);
    cut.extend_from_slice(&with_special[prefix..prefix + keep.min(without_special.len())]);
    cut.extend_from_slice(&with_special[with_special.len() - suffix..]);
    cut.truncate(limit);
    cut
}

/// The cosine similarity of two vectors (0 when either is all zeros).
pub fn cosine_similarity(a: &[f32], b: &[f32]) -> f64 {
    let (mut dot, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (f64::from(*x), f64::from(*y));
        dot += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa == 0.0 || bb == 0.0 {
        0.0
    } else {
        dot / (aa.sqrt() * bb.sqrt())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_oversized_requests_are_refused_naming_input() {
        for request in [
            EmbeddingRequest::new(Vec::<String>::new()),
            EmbeddingRequest::new(["a", ""]),
            EmbeddingRequest::new([Vec::<u32>::new()]),
            EmbeddingRequest::new(vec!["a"; MAX_EMBEDDING_INPUTS + 1]),
        ] {
            let err = request.validate().unwrap_err();
            assert!(err.to_string().contains("`input`"), "{err}");
        }
        EmbeddingRequest::new(["a", "b"]).validate().unwrap();
    }

    #[test]
    fn dimensions_other_than_the_models_width_are_refused() {
        let request = EmbeddingRequest::new(["a"]).with_dimensions(128);
        assert!(request.check_dimensions(384).is_err());
        assert!(request.check_dimensions(128).is_ok());
        assert!(EmbeddingRequest::new(["a"]).check_dimensions(384).is_ok());
    }

    #[test]
    fn truncation_keeps_the_special_tokens_at_both_ends() {
        let with = [101, 1, 2, 3, 4, 5, 102];
        let without = [1, 2, 3, 4, 5];
        assert_eq!(truncate_tokens(&with, &without, 4), vec![101, 1, 2, 102]);
        assert_eq!(truncate_tokens(&with, &without, 7), with.to_vec());
        // A decoder's start token only.
        assert_eq!(truncate_tokens(&[1, 9, 8, 7], &[9, 8, 7], 3), vec![1, 9, 8]);
        // No special tokens at all.
        assert_eq!(truncate_tokens(&[9, 8, 7], &[9, 8, 7], 2), vec![9, 8]);
        // Split otherwise with the specials: the head is kept, no stray tail.
        assert_eq!(
            truncate_tokens(&[1, 5, 6, 7, 8, 2], &[9, 7, 8], 4),
            vec![1, 5, 6, 7]
        );
    }

    #[test]
    fn inputs_read_as_text_or_token_ids() {
        let inputs: Vec<EmbeddingInput> = serde_json::from_str(r#"["hi", [1, 2]]"#).unwrap();
        assert_eq!(
            inputs,
            vec![EmbeddingInput::from("hi"), EmbeddingInput::from(vec![1, 2])]
        );
    }

    #[test]
    fn cosine_of_parallel_vectors_is_one() {
        assert!((cosine_similarity(&[1.0, 2.0], &[2.0, 4.0]) - 1.0).abs() < 1e-12);
        assert_eq!(cosine_similarity(&[0.0, 0.0], &[1.0, 0.0]), 0.0);
    }
}
