//! OpenAI's embeddings API (`POST /v1/embeddings`) on the wire, both
//! directions: the body our client sends an engine and reads back
//! ([`EmbeddingsResponse::into_embeddings`]), and the body our router reads
//! ([`EmbeddingsRequest::into_request`]) and answers
//! ([`EmbeddingsResponse::from_embeddings`]).
//!
//! `input` is a string, a list of strings, a list of token ids or a list of
//! such lists; `encoding_format` is `float` (the default) or `base64` (the
//! vectors' little-endian `f32` bytes, as OpenAI sends them); `dimensions`
//! is refused unless it is the model's width. `truncate: true` (an extension
//! this server shares with Hugging Face's text-embeddings-inference) cuts an
//! input past the model's context instead of refusing it.

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use runtime_core::{EmbeddingInput, EmbeddingRequest, Embeddings, Error, Result};

use crate::wire::Extra;

/// `POST /v1/embeddings` request body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingsRequest {
    /// The model to use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// What to embed.
    #[serde(deserialize_with = "read_input")]
    pub input: Input,
    /// `float` or `base64`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding_format: Option<String>,
    /// The width asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dimensions: Option<u32>,
    /// Cut inputs past the context instead of refusing them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncate: Option<bool>,
    /// Everything else, refused unless it is metadata (`user`).
    #[serde(flatten)]
    pub extra: Extra,
}

/// The forms `input` takes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Input {
    /// One text.
    One(String),
    /// One text's token ids.
    Tokens(Vec<u32>),
    /// Several inputs, texts or token ids.
    Many(Vec<EmbeddingInput>),
}

/// What `input` may be, said when it is something else.
const INPUT_FORMS: &str = "`input` must be a string, a list of strings, a list of token ids \
                           (integers from 0 to 4294967295) or a list of such lists";

/// `input` in any of its forms, with one clear error for anything else.
fn read_input<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> std::result::Result<Input, D::Error> {
    use serde::de::Error as _;
    let tokens = |values: &[Value]| -> Option<Vec<u32>> {
        values
            .iter()
            .map(|v| v.as_u64().and_then(|n| u32::try_from(n).ok()))
            .collect()
    };
    let refused = || D::Error::custom(INPUT_FORMS);
    match Value::deserialize(deserializer)? {
        Value::String(text) => Ok(Input::One(text)),
        Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_number) => {
            tokens(&items).map(Input::Tokens).ok_or_else(refused)
        }
        Value::Array(items) => items
            .into_iter()
            .map(|item| match item {
                Value::String(text) => Some(EmbeddingInput::Text(text)),
                Value::Array(ids) => tokens(&ids).map(EmbeddingInput::Tokens),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()
            .map(Input::Many)
            .ok_or_else(refused),
        _ => Err(refused()),
    }
}

impl EmbeddingsRequest {
    /// The body our client sends an engine for `inputs` (as floats;
    /// `dimensions` is checked on the answer). `truncate` is sent only when
    /// set: it is an extension, which a server that does not know it may
    /// refuse.
    pub fn for_engine(inputs: &[EmbeddingInput], model: Option<&str>, truncate: bool) -> Self {
        Self {
            model: model.map(str::to_owned),
            input: Input::Many(inputs.to_vec()),
            encoding_format: Some("float".to_owned()),
            dimensions: None,
            truncate: truncate.then_some(true),
            extra: Extra::new(),
        }
    }

    /// The core request, and whether to answer in base64; anything this
    /// server does not implement is refused by name.
    pub fn into_request(self) -> Result<(EmbeddingRequest, bool)> {
        let base64 = match self.encoding_format.as_deref() {
            None | Some("float") => false,
            Some("base64") => true,
            Some(other) => {
                return Err(Error::invalid_request(
                    "encoding_format",
                    format!("is `{other}`; send `float` or `base64`"),
                ));
            }
        };
        for (field, value) in &self.extra {
            if value.is_null() || field == "user" {
                continue;
            }
            return Err(Error::invalid_request(
                field.clone(),
                format!(
                    "is {value}, which this server does not implement for embeddings; leave it out"
                ),
            ));
        }
        let inputs = match self.input {
            Input::One(text) => vec![EmbeddingInput::Text(text)],
            Input::Tokens(tokens) => vec![EmbeddingInput::Tokens(tokens)],
            Input::Many(inputs) => inputs,
        };
        let mut request = EmbeddingRequest::new(inputs).with_truncate(self.truncate == Some(true));
        request.dimensions = self.dimensions;
        request.validate()?;
        Ok((request, base64))
    }
}

/// `POST /v1/embeddings` response body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingsResponse {
    /// `list`.
    #[serde(default)]
    pub object: String,
    /// One entry per input.
    pub data: Vec<EmbeddingData>,
    /// The model that answered.
    #[serde(default)]
    pub model: String,
    /// Token counts.
    #[serde(default)]
    pub usage: Option<EmbeddingsUsage>,
}

/// One vector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingData {
    /// `embedding`.
    #[serde(default)]
    pub object: String,
    /// The input it belongs to.
    pub index: usize,
    /// The vector: floats, or base64 of its little-endian `f32` bytes.
    pub embedding: Value,
}

/// An embeddings answer's token counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmbeddingsUsage {
    /// Tokens read.
    pub prompt_tokens: u64,
    /// The same: nothing is generated.
    pub total_tokens: u64,
}

impl EmbeddingsResponse {
    /// The answer for `embeddings` of `model`, in floats or base64.
    pub fn from_embeddings(embeddings: Embeddings, model: &str, base64: bool) -> Self {
        let data = embeddings
            .vectors
            .into_iter()
            .enumerate()
            .map(|(index, vector)| EmbeddingData {
                object: "embedding".to_owned(),
                index,
                embedding: if base64 {
                    let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
                    Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
                } else {
                    Value::from(vector)
                },
            })
            .collect();
        Self {
            object: "list".to_owned(),
            data,
            model: model.to_owned(),
            usage: Some(EmbeddingsUsage {
                prompt_tokens: embeddings.prompt_tokens,
                total_tokens: embeddings.prompt_tokens,
            }),
        }
    }

    /// The vectors, in input order, of an engine's answer to `expected`
    /// inputs; an answer with another count, a missing index or a vector
    /// that is not numbers is a protocol error.
    pub fn into_embeddings(mut self, expected: usize) -> Result<Embeddings> {
        let malformed = |what: String| Error::StreamProtocol(format!("embeddings answer {what}"));
        if self.data.len() != expected {
            return Err(malformed(format!(
                "has {} vectors for {expected} inputs",
                self.data.len()
            )));
        }
        self.data.sort_by_key(|entry| entry.index);
        let mut vectors = Vec::with_capacity(expected);
        for (position, entry) in self.data.into_iter().enumerate() {
            if entry.index != position {
                return Err(malformed(format!("lacks the vector of input {position}")));
            }
            let vector = match entry.embedding {
                Value::Array(values) => values
                    .iter()
                    .map(|v| v.as_f64().map(|x| x as f32))
                    .collect::<Option<Vec<f32>>>(),
                Value::String(encoded) => decode_base64(&encoded),
                _ => None,
            }
            .ok_or_else(|| malformed(format!("has a malformed vector for input {position}")))?;
            vectors.push(vector);
        }
        let tokens = self.usage.map_or(0, |usage| usage.prompt_tokens);
        Ok(Embeddings::new(vectors, tokens))
    }
}

fn decode_base64(encoded: &str) -> Option<Vec<f32>> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    if bytes.len() % 4 != 0 {
        return None;
    }
    Some(
        bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(body: &str) -> Result<(EmbeddingRequest, bool)> {
        serde_json::from_str::<EmbeddingsRequest>(body)
            .unwrap()
            .into_request()
    }

    #[test]
    fn every_input_form_reads_as_a_list_of_inputs() {
        let one = read(r#"{"input": "hi"}"#).unwrap().0;
        assert_eq!(one.inputs, vec![EmbeddingInput::from("hi")]);
        let tokens = read(r#"{"input": [1, 2]}"#).unwrap().0;
        assert_eq!(tokens.inputs, vec![EmbeddingInput::from(vec![1, 2])]);
        let many = read(r#"{"input": ["a", "b"], "truncate": true}"#)
            .unwrap()
            .0;
        assert_eq!(many.inputs.len(), 2);
        assert!(many.truncate);
        let lists = read(r#"{"input": [[1], [2, 3]]}"#).unwrap().0;
        assert_eq!(lists.inputs[1], EmbeddingInput::from(vec![2, 3]));
    }

    #[test]
    fn unknown_fields_formats_and_empty_input_are_refused_by_name() {
        for (body, field) in [
            (
                r#"{"input": "a", "encoding_format": "int8"}"#,
                "encoding_format",
            ),
            (r#"{"input": "a", "normalize": false}"#, "normalize"),
            (r#"{"input": ""}"#, "input"),
            (r#"{"input": []}"#, "input"),
        ] {
            let err = read(body).unwrap_err();
            assert!(
                err.to_string().contains(&format!("`{field}`")),
                "{body}: {err}"
            );
        }
        assert!(read(r#"{"input": "a", "user": "u1"}"#).is_ok());
    }

    #[test]
    fn base64_answers_carry_the_little_endian_floats() {
        let embeddings = Embeddings::new(vec![vec![1.0, -0.5]], 3);
        let answer = EmbeddingsResponse::from_embeddings(embeddings.clone(), "m", true);
        let Value::String(encoded) = &answer.data[0].embedding else {
            panic!("{answer:?}")
        };
        assert_eq!(decode_base64(encoded).unwrap(), vec![1.0, -0.5]);
        assert_eq!(answer.into_embeddings(1).unwrap(), embeddings);
    }

    #[test]
    fn an_answer_with_a_vector_missing_is_a_protocol_error() {
        let answer =
            EmbeddingsResponse::from_embeddings(Embeddings::new(vec![vec![1.0]], 1), "m", false);
        assert!(matches!(
            answer.into_embeddings(2),
            Err(Error::StreamProtocol(_))
        ));
    }
}
