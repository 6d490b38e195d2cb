//! Embedding models: a BERT-family encoder from a Hugging Face
//! sentence-transformers directory (`config.json`, `model.safetensors`,
//! `tokenizer.json`, `modules.json` and its pooling configuration), run with
//! candle-transformers' BERT.
//!
//! An input is tokenized with the model's special tokens (`[CLS]` … `[SEP]`),
//! inputs of one request are run together in batches of similar length
//! (padding masked out of attention and pooling), the last hidden states are
//! pooled as the model's `1_Pooling/config.json` says (mean over the tokens,
//! or the first token's state) and every vector is normalised to unit
//! length, as llama.cpp and vLLM answer `/v1/embeddings`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use runtime_core::{
    Capabilities, EmbeddingInput, EmbeddingRequest, Embeddings, Error, EventStream,
    InferenceRequest, InferenceResponse, ModelService, Result, truncate_tokens,
};
use tokenizers::Tokenizer;

/// How many inputs are run in one forward pass at most.
const BATCH: usize = 32;
/// How many (padded) tokens one forward pass holds at most.
const BATCH_TOKENS: usize = 16 * 1024;

/// How a sequence's hidden states become one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pooling {
    /// The mean over the sequence's tokens (special tokens included).
    Mean,
    /// The first token's state (`[CLS]`).
    Cls,
}

/// A loaded encoder, ready to embed; clones share it.
#[derive(Debug, Clone)]
pub(crate) struct Encoder(Arc<EncoderModel>);

impl std::ops::Deref for Encoder {
    type Target = EncoderModel;

    fn deref(&self) -> &EncoderModel {
        &self.0
    }
}

/// The encoder's weights, tokenizer and pooling.
pub(crate) struct EncoderModel {
    model: BertModel,
    tokenizer: Tokenizer,
    pooling: Pooling,
    /// The longest input, in tokens.
    pub(crate) context_limit: usize,
    /// The vectors' width.
    width: usize,
    pub(crate) weight_bytes: u64,
    pool: rayon::ThreadPool,
    /// One forward pass at a time: each uses every compute thread.
    running: Mutex<()>,
    /// Requests admitted (running or waiting for the forward pass); past
    /// its permits a request is refused as busy.
    admission: tokio::sync::Semaphore,
    serving: AtomicBool,
}

impl std::fmt::Debug for EncoderModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncoderModel")
            .field("pooling", &self.pooling)
            .field("context_limit", &self.context_limit)
            .field("width", &self.width)
            .finish_non_exhaustive()
    }
}

fn invalid(path: &Path, reason: impl Into<String>) -> Error {
    Error::InvalidModel {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let bytes = std::fs::read(path)
        .map_err(|err| Error::io(format!("error reading {}", path.display()), err))?;
    serde_json::from_slice(&bytes).map_err(|err| invalid(path, format!("is not valid JSON: {err}")))
}

/// The pooling the sentence-transformers configuration in `dir` names:
/// the `Pooling` module of `modules.json` (mean when there is none). A
/// module this encoder does not run (a `Dense` projection, say) or a pooling
/// mode it does not implement is refused, never skipped: the vectors would
/// be wrong.
fn pooling(dir: &Path) -> Result<Pooling> {
    let modules_path = dir.join("modules.json");
    let Ok(modules) = read_json(&modules_path) else {
        return Ok(Pooling::Mean);
    };
    let modules = modules.as_array().cloned().unwrap_or_default();
    let kind = |m: &serde_json::Value| m["type"].as_str().unwrap_or_default().to_owned();
    if let Some(other) = modules.iter().map(kind).find(|t| {
        !["models.Transformer", "models.Pooling", "models.Normalize"]
            .iter()
            .any(|known| t.ends_with(known))
    }) {
        return Err(invalid(
            &modules_path,
            format!(
                "has a `{other}` module, which candle does not run (it runs Transformer, \
                 Pooling and Normalize); serve the model on llama.cpp or vLLM"
            ),
        ));
    }
    let Some(module) = modules.iter().find(|m| kind(m).ends_with("models.Pooling")) else {
        return Ok(Pooling::Mean);
    };
    let config_path: PathBuf = dir
        .join(module["path"].as_str().unwrap_or("1_Pooling"))
        .join("config.json");
    let config = read_json(&config_path)?;
    let modes: Vec<&str> = config
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(key, value)| key.starts_with("pooling_mode_") && value.as_bool() == Some(true))
        .map(|(key, _)| key.as_str())
        .collect();
    match modes.as_slice() {
        ["pooling_mode_mean_tokens"] => Ok(Pooling::Mean),
        ["pooling_mode_cls_token"] => Ok(Pooling::Cls),
        _ => Err(invalid(
            &config_path,
            format!(
                "names the pooling {modes:?}, which candle does not implement (one of mean or \
                 CLS); serve the model on llama.cpp or vLLM"
            ),
        )),
    }
}

impl Encoder {
    /// Loads the sentence-transformers directory `dir`. The longest input is
    /// `context_size` if given (at most the model's positions), else the
    /// `max_seq_length` of its `sentence_bert_config.json`, else its
    /// positions.
    /// At most `admitted` requests are taken at once (the rest are
    /// [`Error::Busy`]).
    pub(crate) fn load(
        dir: &Path,
        context_size: Option<u32>,
        threads: usize,
        admitted: usize,
    ) -> Result<Self> {
        let config_path = dir.join("config.json");
        let config: Config = serde_json::from_value(read_json(&config_path)?).map_err(|err| {
            invalid(
                &config_path,
                format!("is not a BERT configuration candle can run: {err}"),
            )
        })?;
        // candle-transformers' BERT counts positions from 0; RoBERTa and
        // XLM-R, which its configuration also reads, do not.
        if config.model_type.as_deref().is_some_and(|t| t != "bert") {
            return Err(invalid(
                &config_path,
                format!(
                    "is a `{}` model; candle's encoder runs BERT only (serve it on llama.cpp or vLLM)",
                    config.model_type.as_deref().unwrap_or_default()
                ),
            ));
        }
        let positions = config.max_position_embeddings;
        // sentence-transformers' own limit, where the model says one (what
        // it truncates to, and vLLM's default); `context_size` may raise it
        // to the position table's size.
        let trained = read_json(&dir.join("sentence_bert_config.json"))
            .ok()
            .and_then(|c| c["max_seq_length"].as_u64())
            .map_or(positions, |n| (n as usize).min(positions));
        let context_limit = match context_size {
            Some(asked) if asked as usize > positions => {
                return Err(Error::invalid_config(
                    "context_size",
                    format!(
                        "is {asked}, more than the model's {positions} positions; leave it out or lower it"
                    ),
                ));
            }
            Some(asked) => asked as usize,
            None => trained,
        };
        let weights = dir.join("model.safetensors");
        if !weights.is_file() {
            return Err(invalid(dir, "has no model.safetensors"));
        }
        let weight_bytes = std::fs::metadata(&weights).map_or(0, |m| m.len());
        let device = Device::Cpu;
        // Read, not mapped: no unsafe code, and an encoder is small.
        let bytes = std::fs::read(&weights)
            .map_err(|err| Error::io(format!("error reading {}", weights.display()), err))?;
        let vb = VarBuilder::from_buffered_safetensors(bytes, DType::F32, &device)
            .map_err(|err| invalid(&weights, format!("is not safetensors: {err}")))?;
        let model = BertModel::load(vb, &config)
            .map_err(|err| invalid(&weights, format!("does not hold a BERT model: {err}")))?;
        let tokenizer_path = dir.join("tokenizer.json");
        let mut tokenizer = Tokenizer::from_file(&tokenizer_path).map_err(|err| {
            Error::engine(format!("error loading {}", tokenizer_path.display()), err)
        })?;
        // The limit is ours to apply (refused or cut as the request asks),
        // and batches are padded here.
        tokenizer
            .with_truncation(None)
            .map_err(|err| Error::engine("error configuring the tokenizer", err))?;
        tokenizer.with_padding(None);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name(|i| format!("candle-encoder-{i}"))
            .build()
            .map_err(|err| Error::engine("error starting the compute pool", err))?;
        let pooling = pooling(dir)?;
        tracing::info!(
            ?pooling,
            context_limit,
            width = config.hidden_size,
            "candle: BERT encoder loaded"
        );
        Ok(Self(Arc::new(EncoderModel {
            model,
            tokenizer,
            pooling,
            context_limit,
            width: config.hidden_size,
            weight_bytes,
            pool,
            running: Mutex::new(()),
            admission: tokio::sync::Semaphore::new(admitted.max(1)),
            serving: AtomicBool::new(true),
        })))
    }
}

impl EncoderModel {
    pub(crate) fn capabilities() -> Capabilities {
        Capabilities::embedding_only()
    }

    pub(crate) fn is_serving(&self) -> bool {
        self.serving.load(Ordering::SeqCst)
    }

    pub(crate) fn stop(&self) {
        self.serving.store(false, Ordering::SeqCst);
    }

    /// Refuses, naming `field`, a token id past the vocabulary.
    fn check_vocabulary(&self, field: &'static str, tokens: &[u32]) -> Result<()> {
        let vocabulary = self.tokenizer.get_vocab_size(true);
        match tokens.iter().find(|&&t| t as usize >= vocabulary) {
            Some(bad) => Err(Error::invalid_request(
                field,
                format!("holds token {bad}, past the vocabulary of {vocabulary} tokens"),
            )),
            None => Ok(()),
        }
    }

    fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        self.tokenizer
            .encode(text, special)
            .map(|encoding| encoding.get_ids().to_vec())
            .map_err(|err| Error::engine("the tokenizer failed", err))
    }

    /// The tokens of each input, within the limit (cut or refused as the
    /// request asks).
    fn sequences(&self, request: &EmbeddingRequest) -> Result<Vec<Vec<u32>>> {
        let limit = self.context_limit;
        request
            .inputs
            .iter()
            .map(|input| {
                let tokens = match input {
                    EmbeddingInput::Text(text) => {
                        let with = self.encode(text, true)?;
                        if with.len() > limit && request.truncate {
                            truncate_tokens(&with, &self.encode(text, false)?, limit)
                        } else {
                            with
                        }
                    }
                    EmbeddingInput::Tokens(tokens) => {
                        self.check_vocabulary("input", tokens)?;
                        if tokens.len() > limit && request.truncate {
                            tokens[..limit].to_vec()
                        } else {
                            tokens.clone()
                        }
                    }
                };
                if tokens.len() > limit {
                    return Err(Error::ContextExceeded {
                        prompt_tokens: tokens.len() as u64,
                        context_size: limit as u64,
                    });
                }
                Ok(tokens)
            })
            .collect()
    }

    /// One vector per input (blocking: run it off the async workers).
    /// Between batches it stops with [`Error::ShutDown`] once the encoder is
    /// stopped or `cancelled` is set (the request's caller went away).
    pub(crate) fn embed_blocking(
        &self,
        request: &EmbeddingRequest,
        cancelled: &AtomicBool,
    ) -> Result<Embeddings> {
        request.validate()?;
        request.check_dimensions(self.width)?;
        if !self.is_serving() {
            return Err(Error::ShutDown);
        }
        let sequences = self.sequences(request)?;
        let prompt_tokens = sequences.iter().map(|s| s.len() as u64).sum();
        // Similar lengths together, so little is padded.
        let mut order: Vec<usize> = (0..sequences.len()).collect();
        order.sort_by_key(|&i| sequences[i].len());
        let mut vectors = vec![Vec::new(); sequences.len()];
        let mut start = 0;
        while start < order.len() {
            if !self.is_serving() || cancelled.load(Ordering::SeqCst) {
                return Err(Error::ShutDown);
            }
            let mut end = start + 1;
            while end < order.len()
                && end - start < BATCH
                && (end - start + 1) * sequences[order[end]].len() <= BATCH_TOKENS
            {
                end += 1;
            }
            let batch: Vec<&[u32]> = order[start..end]
                .iter()
                .map(|&i| sequences[i].as_slice())
                .collect();
            let pooled = self.forward(&batch)?;
            for (&index, vector) in order[start..end].iter().zip(pooled) {
                vectors[index] = vector;
            }
            start = end;
        }
        Ok(Embeddings::new(vectors, prompt_tokens))
    }

    /// The pooled, normalised vectors of `batch`, padded to its longest.
    fn forward(&self, batch: &[&[u32]]) -> Result<Vec<Vec<f32>>> {
        let failed =
            |err: candle_core::Error| Error::engine("the encoder's forward pass failed", err);
        let longest = batch.iter().map(|s| s.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(batch.len() * longest);
        let mut mask = Vec::with_capacity(batch.len() * longest);
        for sequence in batch {
            ids.extend_from_slice(sequence);
            ids.extend(std::iter::repeat_n(0u32, longest - sequence.len()));
            mask.extend(std::iter::repeat_n(1f32, sequence.len()));
            mask.extend(std::iter::repeat_n(0f32, longest - sequence.len()));
        }
        let shape = (batch.len(), longest);
        let _one_at_a_time = self
            .running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let hidden = self.pool.install(|| {
            let device = &self.model.device;
            let ids = Tensor::from_vec(ids, shape, device)?;
            let types = ids.zeros_like()?;
            let mask = Tensor::from_vec(mask, shape, device)?;
            let hidden = self.model.forward(&ids, &types, Some(&mask))?;
            let pooled = match self.pooling {
                Pooling::Mean => {
                    let weights = mask.unsqueeze(2)?;
                    let summed = hidden.broadcast_mul(&weights)?.sum(1)?;
                    summed.broadcast_div(&weights.sum(1)?)?
                }
                Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1)?,
            };
            let norms = pooled.sqr()?.sum_keepdim(1)?.sqrt()?;
            pooled.broadcast_div(&norms)?.to_vec2::<f32>()
        });
        hidden.map_err(failed)
    }
}

#[async_trait]
impl ModelService for Encoder {
    async fn is_ready(&self) -> bool {
        self.is_serving()
    }

    async fn generate(
        &self,
        _model: Option<&str>,
        request: InferenceRequest,
    ) -> Result<InferenceResponse> {
        EncoderModel::capabilities().admit(&request, "candle")?;
        Err(Error::unsupported(
            "generating text",
            "this embedding model",
        ))
    }

    async fn generate_events(
        &self,
        _model: Option<&str>,
        request: InferenceRequest,
    ) -> Result<EventStream> {
        EncoderModel::capabilities().admit(&request, "candle")?;
        Err(Error::unsupported(
            "generating text",
            "this embedding model",
        ))
    }

    async fn tokenize(
        &self,
        _model: Option<&str>,
        text: &str,
        add_special: bool,
    ) -> Result<Vec<u32>> {
        self.encode(text, add_special)
    }

    async fn detokenize(&self, _model: Option<&str>, tokens: &[u32]) -> Result<String> {
        self.check_vocabulary("tokens", tokens)?;
        self.tokenizer
            .decode(tokens, false)
            .map_err(|err| Error::engine("the tokenizer failed", err))
    }

    async fn embed(&self, _model: Option<&str>, request: EmbeddingRequest) -> Result<Embeddings> {
        let _admitted = self.admission.try_acquire().map_err(|_| {
            Error::Busy(
                "every slot and queue place of the encoder is taken; try again shortly".to_owned(),
            )
        })?;
        // A forward pass is blocking work: off the async workers. Dropping
        // this future (the client went away) stops it at its next batch.
        let cancelled = Arc::new(AtomicBool::new(false));
        let _cancel_on_drop = CancelOnDrop(cancelled.clone());
        let encoder = self.clone();
        tokio::task::spawn_blocking(move || encoder.embed_blocking(&request, &cancelled))
            .await
            .map_err(|err| Error::engine("the encoder task failed", err))?
    }
}

/// Sets its flag when dropped: a request's future tells its blocking work
/// that nobody waits for it any more.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}
