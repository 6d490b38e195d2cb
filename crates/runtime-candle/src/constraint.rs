//! Constrained decoding: a `json_schema` or `json_object` answer held to its
//! schema token by token with llguidance, the library behind vLLM's
//! `guidance` backend. Each step the schema's grammar says which tokens may
//! come next; every other token's logit becomes minus infinity before the
//! sampler draws, so whatever it draws continues a valid answer, at any
//! temperature. Once the grammar is complete (the closing brace) the answer
//! ends; an end-of-turn token is allowed only where the answer may end.
//!
//! Tool calls need nothing more here: `runtime-structured`'s plan turns a
//! required or named tool choice into a schema on the answer.
//!
//! The vocabulary the grammar is matched against is built once per model, on
//! the first constrained request (about 0.1 to 0.3 s for a 49k vocabulary):
//! a model that is never asked for a schema never pays for it.

use std::sync::{Arc, OnceLock};

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use runtime_core::{Error, ResponseFormat, Result};
use serde_json::{Value, json};

use crate::tokenizer::TextTokenizer;

/// The field a schema the grammar compiler refuses is named by.
const SCHEMA_FIELD: &str = "response_format.json_schema.schema";

/// A model's vocabulary as bytes, and its grammar compiler, each built on
/// first use.
#[derive(Default)]
pub(crate) struct Grammars {
    words: OnceLock<std::result::Result<Vec<Vec<u8>>, String>>,
    factory: OnceLock<std::result::Result<Arc<ParserFactory>, String>>,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars")
            .field("built", &self.factory.get().is_some())
            .finish()
    }
}

impl Grammars {
    /// Each token's bytes, by id (a control token is `0xFF` and its name).
    pub(crate) fn words(&self, tokenizer: &TextTokenizer) -> Result<&[Vec<u8>]> {
        self.words
            .get_or_init(|| token_bytes(tokenizer))
            .as_deref()
            .map_err(|reason| vocabulary_failed(reason))
    }

    /// The constraint for `format`, or `None` for free text.
    pub(crate) fn constraint(
        &self,
        tokenizer: &TextTokenizer,
        format: Option<&ResponseFormat>,
    ) -> Result<Option<Constraint>> {
        let schema = match format {
            Some(ResponseFormat::JsonSchema { schema, .. }) => schema.clone(),
            Some(ResponseFormat::JsonObject) => json!({"type": "object"}),
            Some(ResponseFormat::Text) | None => return Ok(None),
            Some(other) => {
                return Err(Error::invalid_request(
                    "response_format",
                    format!("{other:?} is not a format candle can hold an answer to"),
                ));
            }
        };
        let words = self.words(tokenizer)?;
        let factory = self
            .factory
            .get_or_init(|| factory(words, &tokenizer.end_tokens))
            .as_ref()
            .map_err(|reason| vocabulary_failed(reason))?;
        let grammar = TopLevelGrammar::from_json_schema(compact(schema));
        let matcher = Matcher::new(factory.create_parser(grammar));
        if let Some(reason) = matcher.get_error() {
            return Err(Error::invalid_request(
                SCHEMA_FIELD,
                format!("cannot be enforced by llguidance: {}", first_line(&reason)),
            ));
        }
        Ok(Some(Constraint { matcher }))
    }
}

/// The schema with llguidance's compact JSON: no whitespace between tokens,
/// so a small model cannot spend its answer on blanks (vLLM is started with
/// the same, `disable_any_whitespace`).
fn compact(mut schema: Value) -> Value {
    match &mut schema {
        Value::Object(map) => {
            map.insert("x-guidance".into(), json!({"whitespace_flexible": false}));
            schema
        }
        // `true` (anything) or `false` (nothing) have no room for options.
        _ => json!({"allOf": [schema], "x-guidance": {"whitespace_flexible": false}}),
    }
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or(text)
}

fn vocabulary_failed(reason: &str) -> Error {
    Error::engine(
        "error reading the token bytes of the model's tokenizer",
        std::io::Error::other(reason.to_owned()),
    )
}

/// Each token's bytes, from the tokenizer's own description (byte-level BPE
/// or byte fallback); control tokens marked special, so no grammar text can
/// spell them. Errors are text: llguidance's are `anyhow`, and the result is
/// kept for the model's lifetime.
fn token_bytes(tokenizer: &TextTokenizer) -> std::result::Result<Vec<Vec<u8>>, String> {
    let json = tokenizer
        .inner()
        .to_string(false)
        .map_err(|err| err.to_string())?;
    let json: Value = serde_json::from_str(&json).map_err(|err| err.to_string())?;
    llguidance::token_bytes_from_tokenizer_json(&json).map_err(|err| format!("{err:#}"))
}

/// The grammar compiler for a vocabulary, with the tokens that end a turn
/// as the grammar's end of sentence.
fn factory(words: &[Vec<u8>], ends: &[u32]) -> std::result::Result<Arc<ParserFactory>, String> {
    let Some(&first) = ends.first() else {
        return Err(
            "the tokenizer has no end-of-turn token, so a constrained answer could not end"
                .to_owned(),
        );
    };
    let info = TokRxInfo::new(words.len() as u32, first);
    let trie = TokTrie::from(&info, words).with_eos_tokens(ends);
    let env: TokEnv = Arc::new(Vocabulary { trie });
    let mut factory = ParserFactory::new_simple(&env).map_err(|err| format!("{err:#}"))?;
    // Warnings reach callers through our errors, never stderr; errors carry
    // one line, not a dump of the parser's state.
    factory.set_stderr_log_level(0);
    factory.limits_mut().verbose_errors = false;
    Ok(Arc::new(factory))
}

/// The vocabulary as llguidance sees it. Tokenizing is only used to force
/// text the grammar fixes; declared non-canonical, that is off, and the model
/// writes fixed text itself under a mask of one token, which keeps every
/// step one token and the batch simple.
struct Vocabulary {
    trie: TokTrie,
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, bytes: &[u8]) -> Vec<TokenId> {
        self.trie.greedy_tokenize(bytes)
    }

    fn tokenize_is_canonical(&self) -> bool {
        false
    }
}

/// One answer's grammar, advanced token by token.
pub(crate) struct Constraint {
    matcher: Matcher,
}

impl Constraint {
    /// Sets to minus infinity the logit of every token the grammar does not
    /// allow next (and of rows past the vocabulary: padding).
    pub(crate) fn mask(&mut self, logits: &mut [f32]) -> Result<()> {
        let allowed = self
            .matcher
            .compute_mask()
            .map_err(|err| grammar_failed(&err.to_string()))?;
        let known = allowed.len();
        for (token, logit) in logits.iter_mut().enumerate() {
            if token >= known || !allowed.is_allowed(token as TokenId) {
                *logit = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// Advances the grammar past `token`, drawn under [`mask`](Self::mask).
    pub(crate) fn consume(&mut self, token: u32) -> Result<()> {
        self.matcher
            .consume_token(token)
            .map_err(|err| grammar_failed(&err.to_string()))
    }

    /// Whether the answer is complete: nothing may follow.
    pub(crate) fn is_complete(&self) -> bool {
        self.matcher.is_stopped()
    }
}

fn grammar_failed(reason: &str) -> Error {
    Error::engine(
        "error holding the answer to its schema",
        std::io::Error::other(first_line(reason).to_owned()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_json_is_asked_for_whatever_the_schema() {
        let object = compact(json!({"type": "object"}));
        assert_eq!(object["x-guidance"]["whitespace_flexible"], false);
        let anything = compact(json!(true));
        assert_eq!(anything["allOf"][0], true);
        assert_eq!(anything["x-guidance"]["whitespace_flexible"], false);
    }
}
