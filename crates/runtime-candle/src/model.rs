//! Loading a model: weights (GGUF through our own forward pass where it
//! covers the model, else candle's quantized llama; Hugging Face
//! safetensors directories through candle's llama), tokenizer, chat
//! template and context limit.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use candle_transformers::models::llama;
use candle_transformers::models::quantized_llama::{self, MAX_SEQ_LEN};
use runtime_core::{Error, ModelFormat, Result};

use crate::gemma3::{self, Gemma3};
use crate::native::{self, GgufLlama};
use crate::template::ChatTemplate;
use crate::tokenizer::{TextTokenizer, tokenizer_config};

/// Loaded weights, shared by every slot.
#[derive(Debug, Clone)]
pub(crate) enum Weights {
    /// GGUF that our own forward pass covers (see [`crate::native`]).
    Native(Arc<GgufLlama>),
    /// Gemma 3 GGUF, on candle's operations (see [`crate::gemma3`]).
    Gemma3(Arc<Gemma3>),
    /// GGUF: `ModelWeights` clones share their tensors and own a KV cache each.
    Quantized(Box<quantized_llama::ModelWeights>),
    /// Safetensors: the model is shared, each session gets a cache.
    Llama {
        model: Arc<llama::Llama>,
        config: Box<llama::Config>,
    },
}

/// A model ready to serve: weights, tokenizer, template and limits.
#[derive(Debug)]
pub(crate) struct LoadedModel {
    pub(crate) weights: Weights,
    pub(crate) tokenizer: TextTokenizer,
    pub(crate) template: Option<ChatTemplate>,
    /// The most positions the model may use (prompt plus generation).
    pub(crate) context_limit: usize,
    /// The bytes the weights take in memory.
    pub(crate) weight_bytes: u64,
    /// The compiler of schemas into token masks, built on first use.
    pub(crate) grammars: crate::constraint::Grammars,
}

/// Re-quantization applied on load, trading a little accuracy for candle's
/// SIMD kernels (for models on candle's implementation; ours take Q4_1 as it is).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Requantize {
    /// Keep the file's quantization.
    #[default]
    Keep,
    /// Q4_1 tensors become Q8_0.
    #[serde(rename = "q8_0")]
    Q8_0,
    /// Q4_1 tensors become Q4_0.
    #[serde(rename = "q4_0")]
    Q4_0,
}

impl Requantize {
    fn target(self) -> Option<GgmlDType> {
        match self {
            Self::Keep => None,
            Self::Q8_0 => Some(GgmlDType::Q8_0),
            Self::Q4_0 => Some(GgmlDType::Q4_0),
        }
    }
}

impl LoadedModel {
    /// Loads the model at `path` in `format`.
    pub(crate) fn load(
        path: &Path,
        format: ModelFormat,
        context_size: Option<u32>,
        requantize: Requantize,
    ) -> Result<Self> {
        match format {
            ModelFormat::Gguf => load_gguf(path, context_size, requantize),
            ModelFormat::Safetensors => load_safetensors(path, context_size),
            other => Err(Error::UnsupportedFormat {
                backend: "candle",
                expected: "GGUF or a Hugging Face safetensors directory".to_owned(),
                found: other.name().to_owned(),
            }),
        }
    }
}

pub(crate) fn engine_err(context: impl Into<String>) -> impl FnOnce(candle_core::Error) -> Error {
    let context = context.into();
    move |err| Error::engine(context, err)
}

fn load_gguf(
    path: &Path,
    context_size: Option<u32>,
    requantize: Requantize,
) -> Result<LoadedModel> {
    let mut file = File::open(path)
        .map_err(|err| Error::io(format!("error opening {}", path.display()), err))?;
    let content = gguf_file::Content::read(&mut file).map_err(|err| Error::InvalidModel {
        path: path.to_owned(),
        reason: format!("unreadable GGUF: {err}"),
    })?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tokenizer = match dir.join("tokenizer.json") {
        json if json.is_file() => TextTokenizer::from_file(&json)?,
        _ => TextTokenizer::from_gguf(&content)?,
    };
    let template_source = content
        .metadata
        .get("tokenizer.chat_template")
        .and_then(|v| v.to_string().ok().cloned())
        .or_else(|| template_beside(dir));
    let model_context = content
        .metadata
        .get("llama.context_length")
        .and_then(|v| v.to_u32().ok())
        .map_or(MAX_SEQ_LEN, |n| n as usize);

    let weights = match requantize.target() {
        None => gguf_weights(path, content, &mut file)?,
        Some(target) => {
            let requantized = requantize_gguf(&content, &mut file, target)?;
            let mut reader = std::io::Cursor::new(requantized);
            let content = gguf_file::Content::read(&mut reader)
                .map_err(engine_err("error re-reading the requantized model"))?;
            gguf_weights(path, content, &mut reader)?
        }
    };
    let context_limit = match &weights {
        // Ours: the model's whole trained context.
        Weights::Native(model) => limit(context_size, model.hyper.context)?,
        Weights::Gemma3(model) => limit(context_size, model.hyper.context)?,
        // candle's quantized llama caps positions at MAX_SEQ_LEN.
        _ => limit(context_size, model_context.min(MAX_SEQ_LEN))?,
    };

    let template = compile_template(template_source, &tokenizer)?;
    // The tensors are read into memory as stored: the file, less its metadata.
    let weight_bytes = match &weights {
        Weights::Native(model) => model.weight_bytes(),
        _ => std::fs::metadata(path).map_or(0, |meta| meta.len()),
    };
    Ok(LoadedModel {
        weights,
        tokenizer,
        template,
        context_limit,
        weight_bytes,
        grammars: Default::default(),
    })
}

/// The weights of a GGUF: our own forward pass where it covers the model,
/// Gemma 3 on candle's operations, else candle's quantized llama.
fn gguf_weights<R: std::io::Read + std::io::Seek>(
    path: &Path,
    content: gguf_file::Content,
    reader: &mut R,
) -> Result<Weights> {
    if gemma3::is_gemma3(&content) {
        let model = Gemma3::load(&content, reader, path)?;
        tracing::info!(
            layers = model.hyper.layers,
            context = model.hyper.context,
            window = model.hyper.window,
            "GGUF runs as Gemma 3 on candle's operations"
        );
        return Ok(Weights::Gemma3(Arc::new(model)));
    }
    match GgufLlama::load(&content, reader, path)? {
        Ok(model) => {
            tracing::info!(
                kernels = model.kernels(),
                "GGUF runs on model-runtime's own kernels"
            );
            return Ok(Weights::Native(Arc::new(model)));
        }
        Err(native::Unsupported(reason)) => tracing::info!(
            %reason,
            "GGUF runs on candle's quantized llama, slower and capped at {MAX_SEQ_LEN} positions"
        ),
    }
    let weights =
        quantized_llama::ModelWeights::from_gguf(content, reader, &Device::Cpu).map_err(|err| {
            Error::InvalidModel {
                path: path.to_owned(),
                reason: format!("candle cannot load it as a llama-architecture GGUF: {err}"),
            }
        })?;
    Ok(Weights::Quantized(Box::new(weights)))
}

/// Rewrites the GGUF in memory with Q4_1 tensors in `target`.
fn requantize_gguf(
    content: &gguf_file::Content,
    file: &mut File,
    target: GgmlDType,
) -> Result<Vec<u8>> {
    let mut tensors = Vec::with_capacity(content.tensor_infos.len());
    for name in content.tensor_infos.keys() {
        let tensor = content
            .tensor(file, name, &Device::Cpu)
            .map_err(engine_err(format!("error reading tensor {name}")))?;
        let tensor = if tensor.dtype() == GgmlDType::Q4_1 {
            let values = tensor
                .dequantize(&Device::Cpu)
                .map_err(engine_err("error dequantizing"))?;
            QTensor::quantize(&values, target).map_err(engine_err("error requantizing"))?
        } else {
            tensor
        };
        tensors.push((name.clone(), tensor));
    }
    let metadata: Vec<(&str, &gguf_file::Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut buffer = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut buffer, &metadata, &tensor_refs)
        .map_err(engine_err("error writing the requantized model"))?;
    Ok(buffer.into_inner())
}

fn load_safetensors(dir: &Path, context_size: Option<u32>) -> Result<LoadedModel> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path)
            .map_err(|err| Error::io(format!("error reading {}", path.display()), err))
    };
    let mut config: serde_json::Value =
        serde_json::from_str(&read("config.json")?).map_err(|err| Error::InvalidModel {
            path: dir.to_owned(),
            reason: format!("config.json is not JSON: {err}"),
        })?;
    // transformers 5 writes `rope_parameters.rope_theta`; candle reads the
    // older top-level `rope_theta` and would silently fall back to 10000.
    if config
        .get("rope_theta")
        .is_none_or(serde_json::Value::is_null)
        && let Some(theta) = config.pointer("/rope_parameters/rope_theta").cloned()
    {
        config["rope_theta"] = theta;
    }
    let config: llama::LlamaConfig =
        serde_json::from_value(config).map_err(|err| Error::InvalidModel {
            path: dir.to_owned(),
            reason: format!("config.json is not a llama configuration: {err}"),
        })?;
    let config = config.into_config(false);
    let tokenizer_path = dir.join("tokenizer.json");
    if !tokenizer_path.is_file() {
        return Err(Error::InvalidModel {
            path: dir.to_owned(),
            reason: "the directory has no tokenizer.json".to_owned(),
        });
    }
    let tokenizer = TextTokenizer::from_file(&tokenizer_path)?;
    let template_source = tokenizer_config(dir)
        .and_then(|c| c.get("chat_template")?.as_str().map(str::to_owned))
        .or_else(|| template_beside(dir));

    let mut tensors = std::collections::HashMap::new();
    for file in safetensors_files(dir)? {
        let loaded = candle_core::safetensors::load(&file, &Device::Cpu)
            .map_err(engine_err(format!("error reading {}", file.display())))?;
        tensors.extend(loaded);
    }
    // F32 on CPU: candle's bf16 matmuls are much slower there.
    let weight_bytes = tensors
        .values()
        .map(|tensor| tensor.elem_count() as u64 * DType::F32.size_in_bytes() as u64)
        .sum();
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let model = llama::Llama::load(vb, &config).map_err(|err| Error::InvalidModel {
        path: dir.to_owned(),
        reason: format!("candle cannot load it as a llama model: {err}"),
    })?;
    let context_limit = limit(context_size, config.max_position_embeddings)?;
    let template = compile_template(template_source, &tokenizer)?;
    Ok(LoadedModel {
        weights: Weights::Llama {
            model: Arc::new(model),
            config: Box::new(config),
        },
        tokenizer,
        template,
        context_limit,
        weight_bytes,
        grammars: Default::default(),
    })
}

fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|err| Error::io(format!("error listing {}", dir.display()), err))?
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "safetensors"))
        .collect();
    files.sort();
    Ok(files)
}

fn compile_template(
    source: Option<String>,
    tokenizer: &TextTokenizer,
) -> Result<Option<ChatTemplate>> {
    source
        .map(|source| {
            ChatTemplate::new(
                source,
                tokenizer.bos_token.clone(),
                tokenizer.eos_token.clone(),
            )
        })
        .transpose()
}

fn template_beside(dir: &Path) -> Option<String> {
    std::fs::read_to_string(dir.join("chat_template.jinja")).ok()
}

/// The context limit: the configured size, which may not exceed what the model supports.
fn limit(configured: Option<u32>, model: usize) -> Result<usize> {
    match configured {
        None => Ok(model),
        Some(size) if size as usize <= model => Ok(size as usize),
        Some(size) => Err(Error::invalid_config(
            "context_size",
            format!("is {size}, more than this model supports with candle ({model})"),
        )),
    }
}
