//! Tokenizers: `tokenizer.json` beside the model, or one built from a GGUF's
//! own metadata.
//!
//! candle's built-in GGUF tokenizer does not know pre-tokenizers such as
//! SmolLM's and disagrees with llama.cpp on most strings. This one is built the
//! way llama.cpp reads the same metadata: byte-level BPE from
//! `tokenizer.ggml.tokens` and `tokenizer.ggml.merges`, the pre-tokenizer named
//! by `tokenizer.ggml.pre`, and control tokens (type 3) as special tokens.

use std::path::Path;

use candle_core::quantized::gguf_file;
use runtime_core::{Error, Result};
use tokenizers::decoders::DecoderWrapper;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::{
    NormalizerWrapper, Prepend, Replace, Sequence as NormalizerSequence,
};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, Tokenizer};

/// Tokens that end a generation besides the model's own end token, as
/// llama.cpp reads them by their spelling: ends of turns and texts, and a
/// code model's fill-in-the-middle padding and file separators, which end
/// its middle.
const END_MARKERS: [&str; 10] = [
    "<|im_end|>",
    "<end_of_turn>",
    "<|end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|fim_pad|>",
    "<fim_pad>",
    "<|file_sep|>",
    "<|repo_name|>",
    "<EOT>",
];

/// llama.cpp's token type for control tokens (`<|im_start|>`, `<|im_end|>`).
const CONTROL_TOKEN: i32 = 3;

/// llama.cpp's token type for user-defined tokens: text that is always
/// one token (Gemma's `<start_of_image>`, markup and whitespace runs).
const USER_DEFINED_TOKEN: i32 = 4;

/// SentencePiece's spelling of a space.
const SPACE: &str = "\u{2581}";

/// A tokenizer and what generation needs to know about its vocabulary.
#[derive(Debug, Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    /// Tokens that end generation.
    pub(crate) end_tokens: Vec<u32>,
    /// The beginning-of-sequence token's text, for chat templates.
    pub(crate) bos_token: String,
    /// The end-of-sequence token's text, for chat templates.
    pub(crate) eos_token: String,
    /// The token a raw prompt starts with, where the model says to add one
    /// (the GGUF's `tokenizer.ggml.add_bos_token`, tokenizer_config.json's
    /// `add_bos_token`); a chat template writes its own.
    pub(crate) prompt_start: Option<u32>,
}

impl TextTokenizer {
    /// Reads `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = Tokenizer::from_file(path)
            .map_err(|err| Error::engine(format!("error loading {}", path.display()), err))?;
        let config = tokenizer_config(path.parent().unwrap_or(Path::new(".")));
        let special = |key: &str| {
            config
                .as_ref()
                .and_then(|c| c.get(key))
                .and_then(|v| v.as_str().or_else(|| v.get("content")?.as_str()))
                .map(str::to_owned)
        };
        let bos_token = special("bos_token").unwrap_or_default();
        let eos_token = special("eos_token").unwrap_or_default();
        let mut end_tokens: Vec<u32> = std::iter::once(eos_token.as_str())
            .chain(END_MARKERS)
            .filter_map(|token| inner.token_to_id(token))
            .collect();
        end_tokens.dedup();
        let adds_bos = config
            .as_ref()
            .and_then(|c| c.get("add_bos_token"))
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false);
        let prompt_start = adds_bos.then(|| inner.token_to_id(&bos_token)).flatten();
        Ok(Self {
            inner,
            end_tokens,
            bos_token,
            eos_token,
            prompt_start,
        })
    }

    /// Builds the tokenizer from the metadata of the GGUF file at `path`.
    pub fn from_gguf_file(path: &Path) -> Result<Self> {
        let mut file = std::fs::File::open(path)
            .map_err(|err| Error::io(format!("error opening {}", path.display()), err))?;
        let content = gguf_file::Content::read(&mut file).map_err(|err| Error::InvalidModel {
            path: path.to_owned(),
            reason: format!("unreadable GGUF: {err}"),
        })?;
        Self::from_gguf(&content)
    }

    /// Builds the tokenizer from a GGUF's metadata.
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        let metadata = &content.metadata;
        let get = |key: &str| {
            metadata.get(key).ok_or_else(|| {
                gguf_error(format!(
                    "the GGUF has no `{key}`; put a tokenizer.json beside it"
                ))
            })
        };
        let model = get("tokenizer.ggml.model")?
            .to_string()
            .map_err(gguf_value)?
            .clone();
        let tokens: Vec<String> = get("tokenizer.ggml.tokens")?
            .to_vec()
            .map_err(gguf_value)?
            .iter()
            .map(|v| v.to_string().cloned().map_err(gguf_value))
            .collect::<Result<_>>()?;
        let token_types: Vec<i32> = match metadata.get("tokenizer.ggml.token_type") {
            Some(types) => types
                .to_vec()
                .map_err(gguf_value)?
                .iter()
                .map(|v| v.to_i32().map_err(gguf_value))
                .collect::<Result<_>>()?,
            None => Vec::new(),
        };
        let flag = |key: &str| metadata.get(key).and_then(|v| v.to_bool().ok());
        let id = |key: &str| metadata.get(key).and_then(|v| v.to_u32().ok());
        let mut inner = match model.as_str() {
            "gpt2" => {
                let merges: Vec<(String, String)> = get("tokenizer.ggml.merges")?
                    .to_vec()
                    .map_err(gguf_value)?
                    .iter()
                    .map(|v| {
                        let merge = v.to_string().map_err(gguf_value)?;
                        merge
                            .split_once(' ')
                            .map(|(a, b)| (a.to_owned(), b.to_owned()))
                            .ok_or_else(|| gguf_error(format!("malformed merge {merge:?}")))
                    })
                    .collect::<Result<_>>()?;
                let pre = metadata
                    .get("tokenizer.ggml.pre")
                    .and_then(|v| v.to_string().ok())
                    .map_or("default", String::as_str);
                byte_level_bpe(&tokens, merges, pre)?
            }
            "llama" => {
                let scores: Vec<f32> = get("tokenizer.ggml.scores")?
                    .to_vec()
                    .map_err(gguf_value)?
                    .iter()
                    .map(|v| v.to_f32().map_err(gguf_value))
                    .collect::<Result<_>>()?;
                if scores.len() != tokens.len() {
                    return Err(gguf_error(format!(
                        "{} scores for {} tokens",
                        scores.len(),
                        tokens.len()
                    )));
                }
                let unknown = id("tokenizer.ggml.unknown_token_id")
                    .and_then(|id| tokens.get(id as usize).cloned());
                // llama.cpp's default when the key is absent.
                let space_prefix = flag("tokenizer.ggml.add_space_prefix").unwrap_or(true);
                sentencepiece(&tokens, &scores, unknown, space_prefix)?
            }
            other => {
                return Err(gguf_error(format!(
                    "tokenizer model `{other}` is not supported (byte-level BPE, `gpt2`, and \
                     SentencePiece, `llama`, are); put a tokenizer.json beside the model"
                )));
            }
        };
        // Control tokens are special (a template's turn markers); user-defined
        // ones are plain text that is always one token. llama.cpp matches both
        // in the raw text before the model sees the rest.
        let added: Vec<AddedToken> = tokens
            .iter()
            .zip(&token_types)
            .filter_map(|(token, kind)| match *kind {
                CONTROL_TOKEN => Some(AddedToken::from(token.clone(), true)),
                USER_DEFINED_TOKEN => {
                    Some(AddedToken::from(token.clone(), false).normalized(false))
                }
                _ => None,
            })
            .collect();
        let (special, plain): (Vec<_>, Vec<_>) = added.into_iter().partition(|t| t.special);
        inner.add_special_tokens(&special);
        inner.add_tokens(&plain);

        let text = |id: Option<u32>| {
            id.and_then(|id| tokens.get(id as usize).cloned())
                .unwrap_or_default()
        };
        let eos = id("tokenizer.ggml.eos_token_id");
        let mut end_tokens: Vec<u32> = eos.into_iter().collect();
        end_tokens.extend(id("tokenizer.ggml.eot_token_id"));
        for marker in END_MARKERS {
            if let Some(position) = tokens.iter().position(|t| t == marker)
                && !end_tokens.contains(&(position as u32))
            {
                end_tokens.push(position as u32);
            }
        }
        let adds_bos = flag("tokenizer.ggml.add_bos_token").unwrap_or(false);
        Ok(Self {
            inner,
            end_tokens,
            bos_token: text(id("tokenizer.ggml.bos_token_id")),
            eos_token: text(eos),
            prompt_start: id("tokenizer.ggml.bos_token_id").filter(|_| adds_bos),
        })
    }

    /// Token ids of `text`, special tokens in it recognised as such.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|err| Error::engine("error tokenizing the prompt", err))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Token ids of a raw prompt: [`encode`](Self::encode), after the
    /// start token where the model adds one.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let mut tokens: Vec<u32> = self.prompt_start.into_iter().collect();
        tokens.extend(self.encode(text)?);
        Ok(tokens)
    }

    /// The text of `tokens`, special tokens written out.
    pub fn decode(&self, tokens: &[u32]) -> Result<String> {
        self.inner
            .decode(tokens, false)
            .map_err(|err| Error::invalid_request("tokens", format!("cannot be decoded: {err}")))
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}

/// Byte-level BPE (GPT-2's, `tokenizer.ggml.model = gpt2`): the GGUF's
/// merges in their order, after the pre-tokenizer it names.
fn byte_level_bpe(
    tokens: &[String],
    merges: Vec<(String, String)>,
    pre: &str,
) -> Result<Tokenizer> {
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(id, token)| (token.clone(), id as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|err| Error::engine("error building the BPE model from GGUF metadata", err))?;
    let mut inner = Tokenizer::new(bpe);
    inner.with_pre_tokenizer(Some(pre_tokenizer(pre)?));
    inner.with_decoder(Some(ByteLevelDecoder::default()));
    Ok(inner)
}

/// SentencePiece's BPE (`tokenizer.ggml.model = llama`: Llama 2, Mistral,
/// Gemma, Phi-3), as llama.cpp runs it: spaces written `▁` (one before the
/// text, and after each special token, where the model adds a space
/// prefix), no pre-splitting, then the adjacent pair whose union is the
/// vocabulary's highest-scored token merged first, until none is left; a
/// character outside the vocabulary becomes its UTF-8 bytes (`<0xE4>`).
///
/// The GGUF keeps scores, not merges, so the merges are derived: every way
/// to cut a token into two tokens, ranked by the whole token's score. Ranked
/// merging of those pairs is the same procedure as llama.cpp's.
fn sentencepiece(
    tokens: &[String],
    scores: &[f32],
    unknown: Option<String>,
    space_prefix: bool,
) -> Result<Tokenizer> {
    let ids: std::collections::HashMap<&str, u32> = tokens
        .iter()
        .enumerate()
        .map(|(id, token)| (token.as_str(), id as u32))
        .collect();
    let mut ranked: Vec<(f32, u32, usize)> = Vec::new();
    for (id, token) in tokens.iter().enumerate() {
        for (cut, _) in token.char_indices().skip(1) {
            if ids.contains_key(&token[..cut]) && ids.contains_key(&token[cut..]) {
                ranked.push((scores[id], id as u32, cut));
            }
        }
    }
    // Highest score first; llama.cpp breaks ties by position, which no pair
    // of distinct tokens with the same score can tell apart here, so any
    // fixed order of equal scores serves (by id, then by cut).
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let merges: Vec<(String, String)> = ranked
        .into_iter()
        .map(|(_, id, cut)| {
            let token = &tokens[id as usize];
            (token[..cut].to_owned(), token[cut..].to_owned())
        })
        .collect();
    let vocab: Vocab = ids
        .iter()
        .map(|(token, id)| ((*token).to_owned(), *id))
        .collect();
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true);
    if let Some(unknown) = unknown {
        builder = builder.unk_token(unknown);
    }
    let bpe = builder.build().map_err(|err| {
        Error::engine(
            "error building the SentencePiece model from GGUF metadata",
            err,
        )
    })?;
    let mut inner = Tokenizer::new(bpe);
    let replace = |from: &str, to: &str| {
        Replace::new(from, to).map_err(|err| Error::engine("error building the tokenizer", err))
    };
    let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
    if space_prefix {
        normalizers.push(Prepend::new(SPACE.to_owned()).into());
    }
    normalizers.push(replace(" ", SPACE)?.into());
    inner.with_normalizer(Some(NormalizerSequence::new(normalizers)));
    let mut decoders: Vec<DecoderWrapper> = vec![
        replace(SPACE, " ")?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    inner.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(inner)
}

/// The pre-tokenizer llama.cpp uses for the GGUF's `tokenizer.ggml.pre`.
fn pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper> {
    let byte_level = ByteLevel::new(false, true, true);
    match pre {
        // SmolLM: every digit on its own, then GPT-2's byte-level split.
        "smollm" => Ok(Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()),
        "gpt-2" | "gpt2" | "default" => Ok(byte_level.into()),
        other => Err(gguf_error(format!(
            "pre-tokenizer `{other}` is not supported; put the model's tokenizer.json beside it"
        ))),
    }
}

/// `tokenizer_config.json` in `dir`, if present and valid.
pub(crate) fn tokenizer_config(dir: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join("tokenizer_config.json")).ok()?;
    serde_json::from_str(&text).ok()
}

fn gguf_error(message: String) -> Error {
    Error::engine(
        "unusable GGUF tokenizer metadata",
        std::io::Error::other(message),
    )
}

fn gguf_value(err: candle_core::Error) -> Error {
    Error::engine("unexpected GGUF metadata type", err)
}
