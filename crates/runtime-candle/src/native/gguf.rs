//! Reading a llama-architecture GGUF into [`GgufLlama`]: its shape
//! ([`Hyper`]) from the metadata, every tensor checked before any is read,
//! and the matrices packed for the kernels.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use candle_core::quantized::{GgmlDType, gguf_file};
use runtime_core::{Error, Result};

use crate::kernels::{self, BLOCK, BlockType, GROUP, Kernels};

/// The shape of the model, from the GGUF's metadata.
#[derive(Debug, Clone)]
pub(crate) struct Hyper {
    pub(crate) layers: usize,
    pub(crate) embedding: usize,
    pub(crate) feed_forward: usize,
    pub(crate) heads: usize,
    pub(crate) kv_heads: usize,
    pub(crate) head_dim: usize,
    pub(crate) vocab: usize,
    pub(crate) rope_base: f32,
    pub(crate) rms_eps: f32,
    /// The context the model was trained for.
    pub(crate) context: usize,
}

impl Hyper {
    pub(super) fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }

    pub(super) fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

/// A weight matrix: `rows` rows of `cols / 32` blocks, as the file stores
/// them but [packed](kernels::pack) in groups of four rows.
#[derive(Debug)]
pub(super) struct Matrix {
    pub(super) kind: BlockType,
    pub(super) rows: usize,
    /// Bytes of a group of four rows.
    pub(super) group_bytes: usize,
    pub(super) data: Vec<u8>,
}

impl Matrix {
    pub(super) fn groups(&self) -> usize {
        self.rows / GROUP
    }

    pub(super) fn group(&self, g: usize) -> &[u8] {
        &self.data[g * self.group_bytes..(g + 1) * self.group_bytes]
    }

    /// Row `r`, dequantized into `out`.
    pub(super) fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        kernels::dequantize_row(self.kind, self.group(r / GROUP), r % GROUP, out);
    }
}

#[derive(Debug)]
pub(super) struct Layer {
    pub(super) attn_norm: Vec<f32>,
    /// Q, K and V, multiplied together.
    pub(super) qkv: [Matrix; 3],
    pub(super) output: Matrix,
    pub(super) ffn_norm: Vec<f32>,
    /// Gate and up, multiplied together.
    pub(super) gate_up: [Matrix; 2],
    pub(super) down: Matrix,
}

/// The weights, shared by every slot.
#[derive(Debug)]
pub(crate) struct GgufLlama {
    pub(crate) hyper: Hyper,
    pub(super) embeddings: Matrix,
    pub(super) layers: Vec<Layer>,
    pub(super) output_norm: Vec<f32>,
    /// `None` when the output projection is the embeddings (tied).
    pub(super) output: Option<Matrix>,
    pub(super) kernels: Kernels,
}

/// Why a GGUF is left to candle's implementation.
#[derive(Debug)]
pub(crate) struct Unsupported(pub(crate) String);

impl GgufLlama {
    /// Reads the model from `file`, or says why this implementation does not
    /// cover it (before reading any weights).
    pub(crate) fn load<R: Read + Seek>(
        content: &gguf_file::Content,
        file: &mut R,
        path: &Path,
    ) -> Result<std::result::Result<Self, Unsupported>> {
        let hyper =
            match hyper(content).and_then(|hyper| check_tensors(content, &hyper).map(|()| hyper)) {
                Ok(hyper) => hyper,
                Err(unsupported) => return Ok(Err(unsupported)),
            };
        let mut reader = TensorReader {
            content,
            file,
            path,
        };
        reader.check_length()?;
        let (e, f, h) = (hyper.embedding, hyper.feed_forward, &hyper);
        let embeddings = reader.matrix("token_embd.weight", h.vocab, e)?;
        let output = match content.tensor_infos.contains_key("output.weight") {
            true => Some(reader.matrix("output.weight", h.vocab, e)?),
            false => None,
        };
        let output_norm = reader.vector("output_norm.weight", e)?;
        let mut layers = Vec::with_capacity(h.layers);
        for i in 0..h.layers {
            let name = |t: &str| format!("blk.{i}.{t}.weight");
            layers.push(Layer {
                attn_norm: reader.vector(&name("attn_norm"), e)?,
                qkv: [
                    reader.matrix(&name("attn_q"), h.q_dim(), e)?,
                    reader.matrix(&name("attn_k"), h.kv_dim(), e)?,
                    reader.matrix(&name("attn_v"), h.kv_dim(), e)?,
                ],
                output: reader.matrix(&name("attn_output"), e, h.q_dim())?,
                ffn_norm: reader.vector(&name("ffn_norm"), e)?,
                gate_up: [
                    reader.matrix(&name("ffn_gate"), f, e)?,
                    reader.matrix(&name("ffn_up"), f, e)?,
                ],
                down: reader.matrix(&name("ffn_down"), e, f)?,
            });
        }
        Ok(Ok(Self {
            hyper,
            embeddings,
            layers,
            output_norm,
            output,
            kernels: Kernels::detect(),
        }))
    }

    /// The bytes the weights take in memory.
    pub(crate) fn weight_bytes(&self) -> u64 {
        let matrices = self
            .layers
            .iter()
            .flat_map(|l| l.qkv.iter().chain(&l.gate_up).chain([&l.output, &l.down]));
        let bytes: usize = matrices
            .chain(&self.output)
            .chain([&self.embeddings])
            .map(|m| m.data.len())
            .sum();
        bytes as u64
    }

    /// Which kernels run the products, for logs and reports.
    pub(crate) fn kernels(&self) -> &'static str {
        self.kernels.name
    }
}

/// The model's shape, if this implementation covers it.
pub(super) fn hyper(content: &gguf_file::Content) -> std::result::Result<Hyper, Unsupported> {
    let text = |key: &str| {
        content
            .metadata
            .get(key)
            .and_then(|v| v.to_string().ok().cloned())
    };
    let number = |key: &str| -> Option<u64> {
        let value = content.metadata.get(key)?;
        value
            .to_u32()
            .map(u64::from)
            .or_else(|_| value.to_u64())
            .or_else(|_| value.to_i32().map(|v| v as u64))
            .ok()
    };
    let float = |key: &str| content.metadata.get(key).and_then(|v| v.to_f32().ok());
    let architecture = text("general.architecture").unwrap_or_default();
    if architecture != "llama" {
        return Err(Unsupported(format!(
            "architecture {architecture:?}, not llama"
        )));
    }
    if let Some(scaling) = text("llama.rope.scaling.type").filter(|t| t != "none") {
        return Err(Unsupported(format!("rope scaling {scaling:?}")));
    }
    let required = |key: &str| {
        number(key)
            .map(|n| n as usize)
            .ok_or_else(|| Unsupported(format!("no {key} in the metadata")))
    };
    let embedding = required("llama.embedding_length")?;
    let heads = required("llama.attention.head_count")?;
    let kv_heads = number("llama.attention.head_count_kv").map_or(heads, |n| n as usize);
    if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 || embedding % heads != 0 {
        return Err(Unsupported(format!(
            "{heads} heads over {kv_heads} key-value heads and {embedding} dimensions"
        )));
    }
    let head_dim = embedding / heads;
    let rope_dims = number("llama.rope.dimension_count").map_or(head_dim, |n| n as usize);
    if rope_dims != head_dim || head_dim % 2 != 0 {
        return Err(Unsupported(format!(
            "rotary dimensions {rope_dims} of a {head_dim}-wide head"
        )));
    }
    let vocab = match number("llama.vocab_size") {
        Some(n) => n as usize,
        None => content
            .tensor_infos
            .get("token_embd.weight")
            .map(|t| t.shape.dims()[0])
            .ok_or_else(|| Unsupported("no token_embd.weight".to_owned()))?,
    };
    let feed_forward = required("llama.feed_forward_length")?;
    // Rows pack in groups of four; values in blocks of 32.
    let dims = [embedding, feed_forward, kv_heads * head_dim, vocab];
    if embedding % BLOCK != 0 || feed_forward % BLOCK != 0 || dims.iter().any(|d| d % GROUP != 0) {
        return Err(Unsupported(format!(
            "dimensions {dims:?} are not whole blocks of {BLOCK} and groups of {GROUP}"
        )));
    }
    let layers = required("llama.block_count")?;
    if layers == 0 {
        return Err(Unsupported("no layers".to_owned()));
    }
    Ok(Hyper {
        layers,
        embedding,
        feed_forward,
        heads,
        kv_heads,
        head_dim,
        vocab,
        rope_base: float("llama.rope.freq_base").unwrap_or(10_000.0),
        rms_eps: float("llama.attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
        context: required("llama.context_length")?,
    })
}

/// Checks that every tensor is one this implementation reads, in a type it
/// multiplies: norms in F32, matrices in Q4_1 or Q8_0.
pub(super) fn check_tensors(
    content: &gguf_file::Content,
    hyper: &Hyper,
) -> std::result::Result<(), Unsupported> {
    for (name, info) in &content.tensor_infos {
        if !expected(name, hyper) {
            return Err(Unsupported(format!("tensor {name} is not one of llama's")));
        }
        let norm = name.ends_with("norm.weight");
        let supported = match info.ggml_dtype {
            GgmlDType::F32 => norm,
            GgmlDType::Q4_1 | GgmlDType::Q8_0 => !norm,
            _ => false,
        };
        if !supported {
            return Err(Unsupported(format!(
                "tensor {name} is {:?}",
                info.ggml_dtype
            )));
        }
    }
    Ok(())
}

/// Whether `name` is a tensor this implementation reads.
pub(super) fn expected(name: &str, hyper: &Hyper) -> bool {
    const LAYER: [&str; 9] = [
        "attn_norm",
        "attn_q",
        "attn_k",
        "attn_v",
        "attn_output",
        "ffn_norm",
        "ffn_gate",
        "ffn_up",
        "ffn_down",
    ];
    if matches!(
        name,
        "token_embd.weight" | "output_norm.weight" | "output.weight"
    ) {
        return true;
    }
    let Some(rest) = name.strip_prefix("blk.") else {
        return false;
    };
    let mut parts = rest.splitn(3, '.');
    let (Some(index), Some(tensor), Some("weight")) = (parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    index.parse::<usize>().is_ok_and(|i| i < hyper.layers) && LAYER.contains(&tensor)
}

pub(super) struct TensorReader<'a, R> {
    pub(super) content: &'a gguf_file::Content,
    pub(super) file: &'a mut R,
    pub(super) path: &'a Path,
}

impl<R: Read + Seek> TensorReader<'_, R> {
    pub(super) fn invalid(&self, reason: String) -> Error {
        Error::InvalidModel {
            path: self.path.to_owned(),
            reason,
        }
    }

    /// Checks that the file holds every tensor it lists: a truncated file
    /// (an interrupted download) fails here, before anything is read.
    pub(super) fn check_length(&mut self) -> Result<()> {
        let length = self
            .file
            .seek(SeekFrom::End(0))
            .map_err(|err| Error::io(format!("error reading {}", self.path.display()), err))?;
        let needed = self
            .content
            .tensor_infos
            .values()
            .map(|info| {
                let dtype = info.ggml_dtype;
                let bytes = info.shape.elem_count() / dtype.block_size() * dtype.type_size();
                self.content.tensor_data_offset + info.offset + bytes as u64
            })
            .max()
            .unwrap_or(0);
        if length < needed {
            return Err(self.invalid(format!(
                "the file is truncated: its tensors need {needed} bytes, it has {length} \
                 (an interrupted download? delete it and fetch it again)"
            )));
        }
        Ok(())
    }

    /// The raw bytes of tensor `name`, after checking its shape.
    pub(super) fn bytes(
        &mut self,
        name: &str,
        dims: &[usize],
        block_bytes: usize,
        block: usize,
    ) -> Result<Vec<u8>> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| self.invalid(format!("the tensor {name} is missing")))?;
        if info.shape.dims() != dims {
            return Err(self.invalid(format!(
                "the tensor {name} has shape {:?}, expected {dims:?}",
                info.shape.dims()
            )));
        }
        let len = dims.iter().product::<usize>() / block * block_bytes;
        let offset = self.content.tensor_data_offset + info.offset;
        let mut data = vec![0u8; len];
        self.file
            .seek(SeekFrom::Start(offset))
            .and_then(|_| self.file.read_exact(&mut data))
            .map_err(|err| {
                Error::io(
                    format!("error reading the tensor {name} of {}", self.path.display()),
                    err,
                )
            })?;
        Ok(data)
    }

    pub(super) fn matrix(&mut self, name: &str, rows: usize, cols: usize) -> Result<Matrix> {
        let kind = match self
            .content
            .tensor_infos
            .get(name)
            .map(|info| info.ggml_dtype)
        {
            Some(GgmlDType::Q4_1) => BlockType::Q4_1,
            Some(GgmlDType::Q8_0) => BlockType::Q8_0,
            other => {
                return Err(self.invalid(format!(
                    "the tensor {name} is {other:?}, expected Q4_1 or Q8_0"
                )));
            }
        };
        let data = self.bytes(name, &[rows, cols], kind.block_bytes(), BLOCK)?;
        let row_bytes = cols / BLOCK * kind.block_bytes();
        Ok(Matrix {
            kind,
            rows,
            group_bytes: GROUP * row_bytes,
            data: kernels::pack(kind, &data, row_bytes),
        })
    }

    pub(super) fn vector(&mut self, name: &str, len: usize) -> Result<Vec<f32>> {
        let dtype = self
            .content
            .tensor_infos
            .get(name)
            .map(|info| info.ggml_dtype);
        if dtype != Some(GgmlDType::F32) {
            return Err(self.invalid(format!("the tensor {name} is {dtype:?}, expected F32")));
        }
        let bytes = self.bytes(name, &[len], 4, 1)?;
        Ok(bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }
}
