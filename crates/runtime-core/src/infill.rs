//! Fill-in-the-middle: a completion of the gap between a prefix and a
//! suffix ([`InferenceRequest::infill`]), written in the tokens a code
//! model was trained to read it by.
//!
//! A model knows FIM when its vocabulary holds the three markers of one
//! convention ([`FIM_MARKERS`]) as single tokens. The prompt is then the
//! prefix-suffix-middle order those models are trained on, and llama.cpp's
//! `/infill` builds too: `[start] PRE prefix SUF suffix MID`, where `start`
//! is the model's beginning-of-text token if it adds one. The model writes
//! the middle. (llama.cpp's `/infill` also puts repository-level context
//! before it for models with such tokens; OpenAI's `suffix` has none, so
//! none is invented here.)
//!
//! Two differences from `/infill` remain, by design: the prefix and the
//! suffix are tokenized as any prompt is, special tokens written in them read
//! as such; and a prompt past the context is refused (`ContextExceeded`),
//! not cut to fit a batch.

use crate::{Error, InferenceRequest, ModelRuntime, Prompt, Result};

/// The spellings of the prefix, suffix and middle markers, tried in order.
pub const FIM_MARKERS: &[[&str; 3]] = &[
    // StarCoder, SmolLM, Granite Code.
    ["<fim_prefix>", "<fim_suffix>", "<fim_middle>"],
    // Qwen2.5-Coder, CodeGemma.
    ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"],
    // DeepSeek-Coder.
    ["<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"],
];

/// A model's fill-in-the-middle tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FimTokens {
    /// Starts the text before the gap.
    pub prefix: u32,
    /// Starts the text after the gap.
    pub suffix: u32,
    /// Asks for the middle: the model writes from here.
    pub middle: u32,
}

impl FimTokens {
    /// The first convention of [`FIM_MARKERS`] all of whose markers
    /// `lookup` knows as a token id.
    pub fn find(mut lookup: impl FnMut(&str) -> Option<u32>) -> Option<Self> {
        FIM_MARKERS.iter().find_map(|[prefix, suffix, middle]| {
            Some(Self {
                prefix: lookup(prefix)?,
                suffix: lookup(suffix)?,
                middle: lookup(middle)?,
            })
        })
    }

    /// Asks `runtime`'s tokenizer: a marker is a token when it tokenizes to
    /// exactly one id (special tokens written in text are read as such).
    pub async fn detect<R: ModelRuntime + ?Sized>(runtime: &R) -> Result<Option<Self>> {
        for markers in FIM_MARKERS {
            let mut ids = [0; 3];
            let mut found = true;
            for (id, marker) in ids.iter_mut().zip(markers) {
                match runtime.tokenize(marker, false).await?.as_slice() {
                    [one] => *id = *one,
                    _ => {
                        found = false;
                        break;
                    }
                }
            }
            if found {
                let [prefix, suffix, middle] = ids;
                return Ok(Some(Self {
                    prefix,
                    suffix,
                    middle,
                }));
            }
        }
        Ok(None)
    }

    /// The prompt `start PRE prefix SUF suffix MID`.
    pub fn prompt(&self, start: &[u32], prefix: &[u32], suffix: &[u32]) -> Vec<u32> {
        let mut tokens = Vec::with_capacity(start.len() + prefix.len() + suffix.len() + 3);
        tokens.extend_from_slice(start);
        tokens.push(self.prefix);
        tokens.extend_from_slice(prefix);
        tokens.push(self.suffix);
        tokens.extend_from_slice(suffix);
        tokens.push(self.middle);
        tokens
    }
}

/// The error for a `suffix` sent to a model without FIM tokens.
pub fn no_fim_tokens() -> Error {
    let known = FIM_MARKERS
        .iter()
        .map(|[prefix, ..]| *prefix)
        .collect::<Vec<_>>()
        .join(", ");
    Error::invalid_request(
        "suffix",
        format!(
            "is not served for this model: its vocabulary has no fill-in-the-middle tokens \
             (looked for {known} and their partners); leave `suffix` out and send the text \
             before the gap as `prompt`"
        ),
    )
}

/// Turns a request with a [`suffix`](InferenceRequest::suffix) into a
/// token-id completion of the FIM prompt, tokenized by `runtime`; `fim` is
/// the model's tokens ([`FimTokens::detect`]), `None` when it has none.
/// A request without a suffix is returned as it is.
pub async fn resolve_infill<R: ModelRuntime + ?Sized>(
    runtime: &R,
    fim: Option<FimTokens>,
    mut request: InferenceRequest,
) -> Result<InferenceRequest> {
    let Some(suffix) = request.suffix.take() else {
        return Ok(request);
    };
    let fim = fim.ok_or_else(no_fim_tokens)?;
    let prefix = match &request.prompt {
        Some(Prompt::Text(prefix)) => prefix.clone(),
        // `validate` refuses a suffix without a text prompt.
        _ => return Err(no_text_prompt()),
    };
    let with_start = runtime.tokenize(&prefix, true).await?;
    let prefix = runtime.tokenize(&prefix, false).await?;
    let suffix = runtime.tokenize(&suffix, false).await?;
    let start = start_token(&with_start, &prefix);
    let start: Vec<u32> = start.into_iter().collect();
    request.prompt = Some(Prompt::Tokens(fim.prompt(&start, &prefix, &suffix)));
    Ok(request)
}

/// The beginning-of-text token a model puts before a prompt, where it does:
/// the one token `with_start` (the text tokenized with the model's special
/// tokens) has before `plain` (without). An end-of-text token some
/// tokenizers add after is no part of it (for an empty prefix, a lone token
/// is taken for a start token).
fn start_token(with_start: &[u32], plain: &[u32]) -> Option<u32> {
    match with_start.split_first() {
        Some((first, rest)) if rest.starts_with(plain) => Some(*first),
        _ => None,
    }
}

fn no_text_prompt() -> Error {
    Error::invalid_request("suffix", "needs a text `prompt` (the text before the gap)")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocabulary(words: &'static [(&'static str, u32)]) -> impl FnMut(&str) -> Option<u32> {
        |marker| {
            words
                .iter()
                .find(|(word, _)| *word == marker)
                .map(|(_, id)| *id)
        }
    }

    #[test]
    fn the_first_complete_convention_is_found() {
        let words = &[
            ("<fim_prefix>", 1),
            // StarCoder's suffix marker is missing: the next convention.
            ("<|fim_prefix|>", 10),
            ("<|fim_suffix|>", 11),
            ("<|fim_middle|>", 12),
        ];
        assert_eq!(
            FimTokens::find(vocabulary(words)),
            Some(FimTokens {
                prefix: 10,
                suffix: 11,
                middle: 12
            })
        );
        assert_eq!(FimTokens::find(vocabulary(&[("<fim_prefix>", 1)])), None);
    }

    #[test]
    fn the_prompt_is_prefix_suffix_middle_after_the_start() {
        let fim = FimTokens {
            prefix: 100,
            suffix: 101,
            middle: 102,
        };
        assert_eq!(
            fim.prompt(&[1], &[5, 6], &[7]),
            vec![1, 100, 5, 6, 101, 7, 102]
        );
        assert_eq!(fim.prompt(&[], &[], &[]), vec![100, 101, 102]);
    }

    #[test]
    fn the_start_token_is_the_one_before_the_text_not_one_after() {
        assert_eq!(start_token(&[1, 5, 6], &[5, 6]), Some(1));
        assert_eq!(start_token(&[1, 5, 6, 2], &[5, 6]), Some(1), "BOS and EOS");
        assert_eq!(start_token(&[5, 6, 2], &[5, 6]), None, "EOS only");
        assert_eq!(start_token(&[5, 6], &[5, 6]), None, "nothing added");
        assert_eq!(start_token(&[1], &[]), Some(1), "an empty prefix");
    }

    #[test]
    fn the_refusal_names_the_field_and_what_to_do() {
        let err = no_fim_tokens();
        assert!(matches!(&err, Error::InvalidRequest { field, .. } if field == "suffix"));
        assert!(err.to_string().contains("send the text before the gap"));
    }
}
