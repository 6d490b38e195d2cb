//! Our own forward pass for llama-architecture GGUF models whose matrices are
//! Q4_1 or Q8_0 (the demo model and many small ones): the file's blocks are
//! multiplied as they are, by the [`kernels`](crate::kernels), with no
//! re-quantization. Other GGUF models go to candle's quantized llama.
//!
//! It runs several sequences at once: one call of [`Runner::forward`] takes
//! a batch of steps (a prompt chunk of one sequence, the next token of
//! others), so every weight is read once per batch, not once per sequence.
//! Each sequence has a slot: a KV cache that grows with it, up to the model's
//! trained context.
//!
//! The order of operations follows llama.cpp's CPU backend (8-bit activations
//! per block, RMS norm and softmax sums in `f64`, rotary angles by repeated
//! multiplication), so greedy tokens match its own up to near ties.

pub(crate) mod math;
pub(crate) mod pool;

use std::cell::RefCell;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::quantized::{GgmlDType, gguf_file};
use half::f16;
use runtime_core::{Error, Result};

use crate::CacheType;
use crate::kernels::{self, BLOCK, BlockType, CacheValue, GROUP, HeadCache, Kernels, Quantized};
use pool::Pool;

/// Prompt tokens one forward pass takes at most (llama.cpp's default micro-batch).
pub(crate) const MAX_BATCH: usize = 512;

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
    fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }

    fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

/// A weight matrix: `rows` rows of `cols / 32` blocks, as the file stores
/// them but [packed](kernels::pack) in groups of four rows.
#[derive(Debug)]
struct Matrix {
    kind: BlockType,
    rows: usize,
    /// Bytes of a group of four rows.
    group_bytes: usize,
    data: Vec<u8>,
}

impl Matrix {
    fn groups(&self) -> usize {
        self.rows / GROUP
    }

    fn group(&self, g: usize) -> &[u8] {
        &self.data[g * self.group_bytes..(g + 1) * self.group_bytes]
    }

    /// Row `r`, dequantized into `out`.
    fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        kernels::dequantize_row(self.kind, self.group(r / GROUP), r % GROUP, out);
    }
}

#[derive(Debug)]
struct Layer {
    attn_norm: Vec<f32>,
    /// Q, K and V, multiplied together.
    qkv: [Matrix; 3],
    output: Matrix,
    ffn_norm: Vec<f32>,
    /// Gate and up, multiplied together.
    gate_up: [Matrix; 2],
    down: Matrix,
}

/// The weights, shared by every slot.
#[derive(Debug)]
pub(crate) struct GgufLlama {
    pub(crate) hyper: Hyper,
    embeddings: Matrix,
    layers: Vec<Layer>,
    output_norm: Vec<f32>,
    /// `None` when the output projection is the embeddings (tied).
    output: Option<Matrix>,
    kernels: Kernels,
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
fn hyper(content: &gguf_file::Content) -> std::result::Result<Hyper, Unsupported> {
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
fn check_tensors(
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
fn expected(name: &str, hyper: &Hyper) -> bool {
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

struct TensorReader<'a, R> {
    content: &'a gguf_file::Content,
    file: &'a mut R,
    path: &'a Path,
}

impl<R: Read + Seek> TensorReader<'_, R> {
    fn invalid(&self, reason: String) -> Error {
        Error::InvalidModel {
            path: self.path.to_owned(),
            reason,
        }
    }

    /// Checks that the file holds every tensor it lists: a truncated file
    /// (an interrupted download) fails here, before anything is read.
    fn check_length(&mut self) -> Result<()> {
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
    fn bytes(
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

    fn matrix(&mut self, name: &str, rows: usize, cols: usize) -> Result<Matrix> {
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

    fn vector(&mut self, name: &str, len: usize) -> Result<Vec<f32>> {
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

/// One sequence's part of a batch: `tokens` at `position..`, in `slot`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Step<'a> {
    pub(crate) slot: usize,
    pub(crate) position: usize,
    pub(crate) tokens: &'a [u32],
    /// Whether the logits after the last token are wanted (not for a
    /// prompt chunk that more of the prompt follows).
    pub(crate) logits: bool,
}

/// A slot's keys and values, per layer: `position × kv_dim` values each.
#[derive(Debug)]
struct SlotCache<T> {
    keys: Vec<Vec<T>>,
    values: Vec<Vec<T>>,
}

impl<T: CacheValue> SlotCache<T> {
    fn new(layers: usize) -> Self {
        Self {
            keys: vec![Vec::new(); layers],
            values: vec![Vec::new(); layers],
        }
    }

    /// Positions held.
    fn positions(&self, kv_dim: usize) -> usize {
        self.keys[0].len() / kv_dim
    }

    /// Frees all but `keep` values of each layer's memory.
    fn release(&mut self, keep: usize) {
        for v in self.keys.iter_mut().chain(self.values.iter_mut()) {
            v.clear();
            v.shrink_to(keep);
        }
    }
}

/// The slots' caches, in the precision configured.
#[derive(Debug)]
enum Caches {
    F16(Vec<SlotCache<f16>>),
    F32(Vec<SlotCache<f32>>),
}

impl Caches {
    fn new(cache: CacheType, slots: usize, layers: usize) -> Self {
        match cache {
            CacheType::F32 => Self::F32((0..slots).map(|_| SlotCache::new(layers)).collect()),
            _ => Self::F16((0..slots).map(|_| SlotCache::new(layers)).collect()),
        }
    }

    fn slots(&self) -> usize {
        match self {
            Self::F16(s) => s.len(),
            Self::F32(s) => s.len(),
        }
    }

    fn positions(&self, slot: usize, kv_dim: usize) -> usize {
        match self {
            Self::F16(s) => s[slot].positions(kv_dim),
            Self::F32(s) => s[slot].positions(kv_dim),
        }
    }

    fn release(&mut self, slot: usize, keep: usize) {
        match self {
            Self::F16(s) => s[slot].release(keep),
            Self::F32(s) => s[slot].release(keep),
        }
    }
}

/// Buffers of one forward pass, kept between passes.
#[derive(Debug, Default)]
struct Scratch {
    /// (slot, position) of each token of the batch.
    tokens: Vec<(usize, usize)>,
    /// Cosines and sines of each token's rotary angles, interleaved.
    rope: Vec<f32>,
    /// The residual stream, `tokens × embedding`.
    x: Vec<f32>,
    normed: Vec<f32>,
    acts: Quantized,
    qkv: Vec<f32>,
    attention: Vec<f32>,
    projected: Vec<f32>,
    gate_up: Vec<f32>,
    transposed: Vec<f32>,
    /// Which tokens' logits are wanted.
    last: Vec<usize>,
    logits: Vec<f32>,
}

/// The mutable half of the model: the slots' KV caches, the buffers and the
/// compute threads, owned by the one thread that runs the engine.
#[derive(Debug)]
pub(crate) struct Runner {
    model: Arc<GgufLlama>,
    pool: Pool,
    slots: Caches,
    scratch: Scratch,
    stop: Arc<AtomicBool>,
}

thread_local! {
    /// Each compute thread's attention scores.
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

impl Runner {
    /// Slots for `slots` sequences, computed on `threads` threads; a forward
    /// pass ends early with [`Error::ShutDown`] once `stop` is set.
    pub(crate) fn new(
        model: Arc<GgufLlama>,
        slots: usize,
        threads: usize,
        cache: CacheType,
        stop: Arc<AtomicBool>,
    ) -> Result<Self> {
        let pool = Pool::new(threads)
            .map_err(|err| Error::io("error starting the compute threads", err))?;
        let slots = Caches::new(cache, slots, model.hyper.layers);
        Ok(Self {
            model,
            pool,
            slots,
            scratch: Scratch::default(),
            stop,
        })
    }

    /// Frees what `slot` holds beyond a small reserve.
    pub(crate) fn release(&mut self, slot: usize) {
        const KEEP_POSITIONS: usize = 1024;
        let keep = KEEP_POSITIONS * self.model.hyper.kv_dim();
        self.slots.release(slot, keep);
    }

    /// Runs `steps` (each slot at most once) and returns the logits wanted,
    /// `vocab` values per step that asked, in order.
    pub(crate) fn forward(&mut self, steps: &[Step<'_>]) -> Result<&[f32]> {
        let h = self.model.hyper.clone();
        self.prepare(steps)?;
        let Self {
            model,
            pool,
            slots,
            scratch,
            stop,
        } = self;
        let model = &**model;
        let n = scratch.tokens.len();
        let (e, qd, kvd, f) = (h.embedding, h.q_dim(), h.kv_dim(), h.feed_forward);
        let qkv_width = qd + 2 * kvd;

        // Embeddings.
        scratch.x.resize(n * e, 0.0);
        let tokens = steps.iter().flat_map(|s| s.tokens);
        for (token, x) in tokens.zip(scratch.x.chunks_exact_mut(e)) {
            model.embeddings.dequantize_row(*token as usize, x);
        }
        scratch.normed.resize(n * e, 0.0);
        scratch.qkv.resize(n * qkv_width, 0.0);
        scratch.attention.resize(n * qd, 0.0);
        scratch.projected.resize(n * e, 0.0);
        scratch.gate_up.resize(n * 2 * f, 0.0);

        for (index, layer) in model.layers.iter().enumerate() {
            if stop.load(Ordering::Relaxed) {
                return Err(Error::ShutDown);
            }
            // Attention.
            norm_and_quantize(
                &scratch.x,
                &layer.attn_norm,
                h.rms_eps,
                e,
                &mut scratch.normed,
                &mut scratch.acts,
            );
            let qkv = [&layer.qkv[0], &layer.qkv[1], &layer.qkv[2]];
            matmul(
                pool,
                &model.kernels,
                &qkv,
                &scratch.acts,
                e,
                n,
                &mut scratch.qkv,
                &mut scratch.transposed,
            );
            match slots {
                Caches::F16(slots) => store_and_attend(pool, model, index, slots, scratch),
                Caches::F32(slots) => store_and_attend(pool, model, index, slots, scratch),
            }
            scratch.acts.clear();
            for row in scratch.attention.chunks_exact(qd) {
                scratch.acts.push(row);
            }
            matmul(
                pool,
                &model.kernels,
                &[&layer.output],
                &scratch.acts,
                qd,
                n,
                &mut scratch.projected,
                &mut scratch.transposed,
            );
            add(&mut scratch.x, &scratch.projected);

            // Feed-forward.
            norm_and_quantize(
                &scratch.x,
                &layer.ffn_norm,
                h.rms_eps,
                e,
                &mut scratch.normed,
                &mut scratch.acts,
            );
            let gate_up = [&layer.gate_up[0], &layer.gate_up[1]];
            matmul(
                pool,
                &model.kernels,
                &gate_up,
                &scratch.acts,
                e,
                n,
                &mut scratch.gate_up,
                &mut scratch.transposed,
            );
            scratch.acts.clear();
            for row in scratch.gate_up.chunks_exact_mut(2 * f) {
                let (gate, up) = row.split_at_mut(f);
                math::silu_mul(gate, up);
                scratch.acts.push(gate);
            }
            matmul(
                pool,
                &model.kernels,
                &[&layer.down],
                &scratch.acts,
                f,
                n,
                &mut scratch.projected,
                &mut scratch.transposed,
            );
            add(&mut scratch.x, &scratch.projected);
        }

        // Logits of the last token of each step that wants them.
        let wanted = scratch.last.len();
        scratch.normed.resize(wanted * e, 0.0);
        scratch.acts.clear();
        for (i, &t) in scratch.last.iter().enumerate() {
            let normed = &mut scratch.normed[i * e..(i + 1) * e];
            math::rms_norm(
                &scratch.x[t * e..(t + 1) * e],
                &model.output_norm,
                h.rms_eps,
                normed,
            );
            scratch.acts.push(normed);
        }
        scratch.logits.resize(wanted * h.vocab, 0.0);
        let output = model.output.as_ref().unwrap_or(&model.embeddings);
        matmul(
            pool,
            &model.kernels,
            &[output],
            &scratch.acts,
            e,
            wanted,
            &mut scratch.logits,
            &mut scratch.transposed,
        );
        Ok(&scratch.logits)
    }

    /// Checks the steps and lays out the batch: each token's slot and
    /// position, rotary angles, and which logits are wanted.
    fn prepare(&mut self, steps: &[Step<'_>]) -> Result<()> {
        let h = &self.model.hyper;
        let scratch = &mut self.scratch;
        scratch.tokens.clear();
        scratch.last.clear();
        for (i, step) in steps.iter().enumerate() {
            if step.slot >= self.slots.slots() || steps[..i].iter().any(|s| s.slot == step.slot) {
                return Err(Error::engine(
                    "a batch names a slot twice or one that does not exist",
                    std::io::Error::other(format!("slot {}", step.slot)),
                ));
            }
            let cached = self.slots.positions(step.slot, h.kv_dim());
            if step.position > cached
                || step.position + step.tokens.len() > h.context
                || step.tokens.is_empty()
            {
                return Err(Error::engine(
                    "a batch step does not continue its sequence within the context",
                    std::io::Error::other(format!(
                        "position {} of {cached} cached, {} tokens, context {}",
                        step.position,
                        step.tokens.len(),
                        h.context
                    )),
                ));
            }
            if let Some(token) = step.tokens.iter().find(|&&t| t as usize >= h.vocab) {
                return Err(Error::engine(
                    "a token is outside the model's vocabulary",
                    std::io::Error::other(format!("token {token} of {}", h.vocab)),
                ));
            }
            for offset in 0..step.tokens.len() {
                scratch.tokens.push((step.slot, step.position + offset));
            }
            if step.logits {
                scratch.last.push(scratch.tokens.len() - 1);
            }
        }
        // Rotary angles as ggml computes them: θ = p, then θ ×= base^(-2/d) per pair.
        let theta_scale = h.rope_base.powf(-2.0 / h.head_dim as f32);
        scratch.rope.clear();
        for &(_, position) in &scratch.tokens {
            let mut theta = position as f32;
            for _ in 0..h.head_dim / 2 {
                scratch.rope.push(theta.cos());
                scratch.rope.push(theta.sin());
                theta *= theta_scale;
            }
        }
        Ok(())
    }
}

/// Rotates each head of `x` by the angles in `rope`, pairs of adjacent values
/// (llama.cpp's "normal" rotary mode, which GGUF llama weights are laid out for).
fn rotate(x: &mut [f32], rope: &[f32], head_dim: usize) {
    for head in x.chunks_exact_mut(head_dim) {
        for (pair, angle) in head.chunks_exact_mut(2).zip(rope.chunks_exact(2)) {
            let (cos, sin) = (angle[0], angle[1]);
            let (x0, x1) = (pair[0], pair[1]);
            pair[0] = x0 * cos - x1 * sin;
            pair[1] = x0 * sin + x1 * cos;
        }
    }
}

fn add(x: &mut [f32], y: &[f32]) {
    for (x, y) in x.iter_mut().zip(y) {
        *x += y;
    }
}

/// RMS-normalises each row of `x` with `weight` and quantizes the result.
fn norm_and_quantize(
    x: &[f32],
    weight: &[f32],
    eps: f32,
    width: usize,
    normed: &mut [f32],
    acts: &mut Quantized,
) {
    acts.clear();
    for (x, out) in x.chunks_exact(width).zip(normed.chunks_exact_mut(width)) {
        math::rms_norm(x, weight, eps, out);
        acts.push(out);
    }
}

/// Rotates each token's queries and keys, stores its keys and values in its
/// slot's cache, then runs each token's attention over its slot's cache, one
/// (token, key-value head) per task: the query heads sharing a key-value
/// head read its cache once.
fn store_and_attend<T: CacheValue>(
    pool: &mut Pool,
    model: &GgufLlama,
    layer: usize,
    slots: &mut [SlotCache<T>],
    scratch: &mut Scratch,
) {
    let h = &model.hyper;
    let (d, qd, kvd) = (h.head_dim, h.q_dim(), h.kv_dim());
    let qkv_width = qd + 2 * kvd;
    for (t, row) in scratch.qkv.chunks_exact_mut(qkv_width).enumerate() {
        let rope = &scratch.rope[t * d..(t + 1) * d];
        let (q, kv) = row.split_at_mut(qd);
        rotate(&mut q[..], rope, d);
        rotate(&mut kv[..kvd], rope, d);
        let (slot, position) = scratch.tokens[t];
        let cache = &mut slots[slot];
        let (keys, values) = (&mut cache.keys[layer], &mut cache.values[layer]);
        keys.truncate(position * kvd);
        values.truncate(position * kvd);
        keys.extend(kv[..kvd].iter().map(|&v| T::from_f32(v)));
        values.extend(kv[kvd..].iter().map(|&v| T::from_f32(v)));
    }

    let group = h.heads / h.kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    let (tokens, qkv, kernels) = (&scratch.tokens, &scratch.qkv, &model.kernels);
    let kv_heads = h.kv_heads;
    let slots = &*slots;
    pool.for_each_chunk_mut(&mut scratch.attention, group * d, |i, out| {
        let (t, kv_head) = (i / kv_heads, i % kv_heads);
        let (slot, position) = tokens[t];
        let queries = &qkv[t * qkv_width + kv_head * group * d..][..group * d];
        let cache = HeadCache {
            keys: &slots[slot].keys[layer],
            values: &slots[slot].values[layer],
            stride: kvd,
            offset: kv_head * d,
            positions: position + 1,
        };
        SCORES.with(|scores| {
            kernels.attend(queries, cache, d, scale, &mut scores.borrow_mut(), out);
        });
    });
}

/// `out[t][..] = mats · acts[t]` for the `tokens` activation rows of width
/// `cols`, the matrices' outputs side by side in each row of `out`.
///
/// Many tokens (a prompt): the tokens are split among the threads, and each
/// multiplies every group of four weight rows, held in L1, with its tokens.
/// Few (generation): the groups are split, and each thread streams its
/// share of the weights once, into a transposed buffer.
#[allow(clippy::too_many_arguments)]
fn matmul(
    pool: &mut Pool,
    kernels: &Kernels,
    mats: &[&Matrix],
    acts: &Quantized,
    cols: usize,
    tokens: usize,
    out: &mut [f32],
    transposed: &mut Vec<f32>,
) {
    let width: usize = mats.iter().map(|m| m.rows).sum();
    debug_assert_eq!(out.len(), tokens * width);
    if tokens == 0 {
        return;
    }
    if tokens >= 8 {
        // A few tiles per thread, so one the OS delays does not hold the others up.
        let tile = (tokens / (pool.threads() * 4)).clamp(4, 16);
        pool.for_each_chunk_mut(out, tile * width, |i, out| {
            let first = i * tile;
            let count = out.len() / width;
            let mut column = 0;
            for m in mats {
                for g in 0..m.groups() {
                    let group = m.group(g);
                    for t in 0..count {
                        let dots = kernels.rows4(m.kind, group, acts.row(first + t, cols));
                        let at = t * width + column + g * GROUP;
                        out[at..at + GROUP].copy_from_slice(&dots);
                    }
                }
                column += m.rows;
            }
        });
        return;
    }

    let groups = width / GROUP;
    let tile = (groups / (pool.threads() * 8)).clamp(4, 64);
    let direct = tokens == 1;
    let target: &mut [f32] = if direct {
        &mut *out
    } else {
        transposed.resize(width * tokens, 0.0);
        &mut transposed[..]
    };
    pool.for_each_chunk_mut(target, tile * GROUP * tokens, |i, out| {
        for (offset, out) in out.chunks_exact_mut(GROUP * tokens).enumerate() {
            // The matrix of global group i·tile + offset.
            let mut g = i * tile + offset;
            let mut m = 0;
            while g >= mats[m].groups() {
                g -= mats[m].groups();
                m += 1;
            }
            let matrix = mats[m];
            let group = matrix.group(g);
            for t in 0..tokens {
                let dots = kernels.rows4(matrix.kind, group, acts.row(t, cols));
                for (j, dot) in dots.into_iter().enumerate() {
                    out[j * tokens + t] = dot;
                }
            }
        }
    });
    if !direct {
        for (t, row) in out.chunks_exact_mut(width).enumerate() {
            for (c, value) in row.iter_mut().enumerate() {
                *value = transposed[c * tokens + t];
            }
        }
    }
}

#[cfg(test)]
mod tests;
