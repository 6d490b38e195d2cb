//! Model file formats and detecting them from content.

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The on-disk format of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum ModelFormat {
    /// GGUF, llama.cpp's single-file format (also read by candle).
    Gguf,
    /// GGML, GGUF's predecessor (`ggml`, `ggmf`, `ggjt` magics).
    Ggml,
    /// ONNX protobuf models.
    Onnx,
    /// A serialized TensorRT engine.
    TensorRt,
    /// Safetensors weights: a single file, or a Hugging Face model directory
    /// (`config.json` plus `*.safetensors`).
    Safetensors,
    /// Apple Core ML (`.mlmodel`, `.mlpackage`).
    CoreMl,
}

/// The GGUF magic, `GGUF` in file order.
const GGUF_MAGIC: &[u8; 4] = b"GGUF";
/// The legacy GGML magics as they appear in file order (little-endian u32s).
const GGML_MAGICS: [&[u8; 4]; 4] = [b"lmgg", b"fmgg", b"tjgg", b"algg"];
/// Safetensors headers larger than this are not credible (the format caps them at 100 MB).
const MAX_SAFETENSORS_HEADER: u64 = 100 * 1024 * 1024;

impl ModelFormat {
    /// Every format, in declaration order.
    pub const ALL: [ModelFormat; 6] = [
        Self::Gguf,
        Self::Ggml,
        Self::Onnx,
        Self::TensorRt,
        Self::Safetensors,
        Self::CoreMl,
    ];

    /// A short human-readable name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Gguf => "GGUF",
            Self::Ggml => "GGML",
            Self::Onnx => "ONNX",
            Self::TensorRt => "TensorRT",
            Self::Safetensors => "safetensors",
            Self::CoreMl => "Core ML",
        }
    }

    /// File extensions (without the dot) conventionally used for the format.
    pub fn extensions(self) -> &'static [&'static str] {
        match self {
            Self::Gguf => &["gguf"],
            Self::Ggml => &["ggml", "bin"],
            Self::Onnx => &["onnx"],
            Self::TensorRt => &["engine", "plan", "trt"],
            Self::Safetensors => &["safetensors"],
            Self::CoreMl => &["mlmodel", "mlpackage", "mlmodelc"],
        }
    }

    /// Detects the format of the model at `path` from its content.
    ///
    /// Files are recognised by their magic bytes (GGUF, GGML) or header
    /// structure (safetensors: an 8-byte little-endian length followed by a JSON
    /// object). Directories are recognised by their content: a Hugging Face model
    /// directory has `config.json` and `*.safetensors` weights. ONNX, TensorRT and
    /// Core ML have no reliable magic and are recognised by extension.
    ///
    /// A file whose extension claims a format its content contradicts (random
    /// bytes named `.gguf`) is an [`Error::InvalidModel`] that says so.
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use runtime_core::ModelFormat;
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("tiny.gguf");
    /// // The magic, version 3, zero tensors and zero metadata entries.
    /// let mut header = b"GGUF".to_vec();
    /// header.extend(3u32.to_le_bytes());
    /// header.extend(0u64.to_le_bytes());
    /// header.extend(0u64.to_le_bytes());
    /// std::fs::write(&path, header)?;
    /// assert_eq!(ModelFormat::detect(&path)?, ModelFormat::Gguf);
    /// # Ok(())
    /// # }
    /// ```
    pub fn detect(path: impl AsRef<Path>) -> Result<ModelFormat> {
        let path = path.as_ref();
        let meta = match std::fs::metadata(path) {
            Ok(meta) => meta,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::ModelNotFound {
                    path: path.to_owned(),
                });
            }
            Err(err) => {
                return Err(Error::io(
                    format!("error reading metadata of {}", path.display()),
                    err,
                ));
            }
        };
        if meta.is_dir() {
            detect_directory(path)
        } else {
            detect_file(path, meta.len())
        }
    }

    fn from_extension(path: &Path) -> Option<ModelFormat> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        Self::ALL
            .into_iter()
            .find(|format| format.extensions().contains(&ext.as_str()))
    }
}

impl fmt::Display for ModelFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

fn invalid(path: &Path, reason: impl Into<String>) -> Error {
    Error::InvalidModel {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

fn detect_directory(path: &Path) -> Result<ModelFormat> {
    let claimed = ModelFormat::from_extension(path);
    if claimed == Some(ModelFormat::CoreMl) {
        return Ok(ModelFormat::CoreMl);
    }
    let entries = std::fs::read_dir(path)
        .map_err(|err| Error::io(format!("error listing {}", path.display()), err))?;
    let mut has_config = false;
    let mut has_safetensors = false;
    for entry in entries {
        let entry =
            entry.map_err(|err| Error::io(format!("error listing {}", path.display()), err))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        has_config |= name == "config.json";
        has_safetensors |= name.ends_with(".safetensors");
    }
    match (has_config, has_safetensors) {
        (true, true) => Ok(ModelFormat::Safetensors),
        (true, false) => Err(invalid(
            path,
            "the directory has config.json but no *.safetensors weights",
        )),
        (false, true) => Err(invalid(
            path,
            "the directory has *.safetensors weights but no config.json",
        )),
        (false, false) => Err(invalid(
            path,
            "a model directory needs config.json and *.safetensors weights",
        )),
    }
}

fn detect_file(path: &Path, len: u64) -> Result<ModelFormat> {
    let claimed = ModelFormat::from_extension(path);
    if len == 0 {
        return Err(invalid(path, "the file is empty"));
    }
    let mut head = [0u8; 16];
    let read = read_prefix(path, &mut head)?;
    let head = &head[..read];

    if head.starts_with(GGUF_MAGIC) {
        return check_gguf_version(path, head);
    }
    if GGML_MAGICS.iter().any(|magic| head.starts_with(*magic)) {
        return Ok(ModelFormat::Ggml);
    }
    if looks_like_safetensors(path, head, len)? {
        return Ok(ModelFormat::Safetensors);
    }
    match claimed {
        Some(format @ (ModelFormat::Gguf | ModelFormat::Ggml | ModelFormat::Safetensors)) => {
            Err(invalid(
                path,
                format!(
                    "the name says {format} but the content is not ({})",
                    describe_magic(head)
                ),
            ))
        }
        // No magic to check for these; trust the extension.
        Some(format) => Ok(format),
        None => Err(invalid(
            path,
            format!(
                "unrecognised model format ({}); expected GGUF, GGML, safetensors, \
                 or a file named .onnx, .engine or .mlmodel",
                describe_magic(head)
            ),
        )),
    }
}

fn read_prefix(path: &Path, buf: &mut [u8]) -> Result<usize> {
    let context = || format!("error reading {}", path.display());
    let mut file = File::open(path).map_err(|err| Error::io(context(), err))?;
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(err) => return Err(Error::io(context(), err)),
        }
    }
    Ok(filled)
}

fn check_gguf_version(path: &Path, head: &[u8]) -> Result<ModelFormat> {
    let Some(version) = head.get(4..8) else {
        return Err(invalid(path, "GGUF magic but the header is truncated"));
    };
    let version = u32::from_le_bytes(version.try_into().expect("slice of four bytes"));
    if (1..=3).contains(&version) {
        Ok(ModelFormat::Gguf)
    } else {
        Err(invalid(
            path,
            format!("GGUF magic but unsupported version {version}"),
        ))
    }
}

/// Whether the GGUF file at `path` carries the metadata key `key` (such as
/// `tokenizer.chat_template`). Reads the header's key-value section only,
/// skipping the values it passes, never the tensors.
///
/// # Errors
///
/// [`Error::InvalidModel`] for a file that is not GGUF or whose header is
/// cut short or malformed, [`Error::Io`] when it cannot be read.
pub fn gguf_has_metadata(path: impl AsRef<Path>, key: &str) -> Result<bool> {
    let mut found = false;
    walk_gguf_metadata(path.as_ref(), |name, _| {
        found = name == key.as_bytes();
        found
    })?;
    Ok(found)
}

/// The context the GGUF model at `path` was trained for
/// (`{general.architecture}.context_length`), if its header says.
///
/// # Errors
///
/// As [`gguf_has_metadata`].
pub fn gguf_context_length(path: impl AsRef<Path>) -> Result<Option<u64>> {
    let mut architecture = None;
    let mut lengths = Vec::new();
    walk_gguf_metadata(path.as_ref(), |name, value| {
        match value {
            GgufValue::Str(value) if name == b"general.architecture" => {
                architecture = Some(value.to_vec());
            }
            GgufValue::Uint(value) if name.ends_with(b".context_length") => {
                lengths.push((name.to_vec(), value));
            }
            _ => {}
        }
        false
    })?;
    let Some(mut key) = architecture else {
        return Ok(None);
    };
    key.extend_from_slice(b".context_length");
    Ok(lengths
        .into_iter()
        .find(|(name, _)| *name == key)
        .map(|(_, value)| value))
}

/// Whether the model at `path` is an embedding model (an encoder, or a
/// decoder trained to embed), which is embedded rather than generated from:
/// a GGUF whose architecture has a pooling type
/// (`{general.architecture}.pooling_type`, which the conversion of a
/// sentence-transformers model writes), or a Hugging Face directory that is
/// a sentence-transformers model (a `Pooling` module in `modules.json`) or
/// whose architecture is a known encoder (`BertModel`, `XLMRobertaModel`, …).
///
/// # Errors
///
/// As [`gguf_has_metadata`] for a GGUF file; a directory whose
/// `config.json` cannot be read is not an embedding model.
pub fn is_embedding_model(path: impl AsRef<Path>) -> Result<bool> {
    let path = path.as_ref();
    if path.is_dir() {
        let modules = std::fs::read_to_string(path.join("modules.json")).unwrap_or_default();
        if modules.contains("sentence_transformers.models.Pooling") {
            return Ok(true);
        }
        let Ok(config) = std::fs::read(path.join("config.json")) else {
            return Ok(false);
        };
        let config: serde_json::Value = serde_json::from_slice(&config).unwrap_or_default();
        let architectures = config["architectures"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        return Ok(architectures
            .iter()
            .filter_map(|a| a.as_str())
            .any(|a| ENCODER_ARCHITECTURES.contains(&a)));
    }
    let mut architecture = None;
    let mut keys = Vec::new();
    walk_gguf_metadata(path, |name, value| {
        if let (b"general.architecture", GgufValue::Str(value)) = (name, value) {
            architecture = Some(value.to_vec());
        }
        if name.ends_with(b".pooling_type") {
            keys.push(name.to_vec());
        }
        false
    })?;
    Ok(architecture.is_some_and(|arch| {
        let mut key = arch;
        key.extend_from_slice(b".pooling_type");
        keys.contains(&key)
    }))
}

/// A GGUF metadata value, as far as [`walk_gguf_metadata`] reads it.
enum GgufValue<'a> {
    Str(&'a [u8]),
    /// An unsigned or non-negative integer of 32 or 64 bits.
    Uint(u64),
    /// Anything else (skipped unread).
    Other,
}

/// Encoder architectures without a head (`config.json`'s `architectures`),
/// which are embedding models even without a sentence-transformers
/// configuration. A list, not a pattern: some generative models are named
/// `…Model` too (ChatGLM's `ChatGLMModel`).
const ENCODER_ARCHITECTURES: &[&str] = &[
    "BertModel",
    "DistilBertModel",
    "RobertaModel",
    "XLMRobertaModel",
    "NomicBertModel",
    "MPNetModel",
    "ModernBertModel",
    "JinaBertModel",
];

/// Calls `visit` with each key of the GGUF header at `path` and its value
/// (strings and integers; others skipped) until it returns `true`.
fn walk_gguf_metadata(
    path: &Path,
    mut visit: impl FnMut(&[u8], GgufValue<'_>) -> bool,
) -> Result<()> {
    let file = File::open(path)
        .map_err(|err| Error::io(format!("error reading {}", path.display()), err))?;
    let mut header = GgufReader {
        inner: std::io::BufReader::new(file),
        path,
    };
    let mut magic = [0u8; 4];
    header.bytes(&mut magic)?;
    if &magic != GGUF_MAGIC {
        return Err(invalid(path, "not a GGUF file"));
    }
    let version = header.u32()?;
    if !(2..=3).contains(&version) {
        return Err(invalid(
            path,
            format!("GGUF version {version} has no metadata this reader knows"),
        ));
    }
    let _tensors = header.u64()?;
    let pairs = header.u64()?;
    for _ in 0..pairs {
        let name = header.string()?;
        let kind = header.u32()?;
        let done = match kind {
            GGUF_STRING => {
                let value = header.string()?;
                visit(&name, GgufValue::Str(&value))
            }
            GGUF_U32 | GGUF_I32 => {
                let value = header.u32()?;
                let value = if kind == GGUF_I32 {
                    u64::try_from(value as i32).ok()
                } else {
                    Some(u64::from(value))
                };
                visit(&name, value.map_or(GgufValue::Other, GgufValue::Uint))
            }
            GGUF_U64 | GGUF_I64 => {
                let value = header.u64()?;
                let value = if kind == GGUF_I64 {
                    u64::try_from(value as i64).ok()
                } else {
                    Some(value)
                };
                visit(&name, value.map_or(GgufValue::Other, GgufValue::Uint))
            }
            _ => {
                header.skip_value(kind, 0)?;
                visit(&name, GgufValue::Other)
            }
        };
        if done {
            break;
        }
    }
    Ok(())
}

/// GGUF value types.
const GGUF_U32: u32 = 4;
const GGUF_I32: u32 = 5;
const GGUF_STRING: u32 = 8;
const GGUF_U64: u32 = 10;
const GGUF_I64: u32 = 11;

/// The longest metadata string or array read: a header claiming more is
/// malformed (a real vocabulary is a few hundred thousand entries).
const GGUF_MAX_LEN: u64 = 1 << 26;

struct GgufReader<'a, R> {
    inner: R,
    path: &'a Path,
}

impl<R: Read> GgufReader<'_, R> {
    fn bytes(&mut self, buf: &mut [u8]) -> Result<()> {
        self.inner.read_exact(buf).map_err(|err| {
            if err.kind() == std::io::ErrorKind::UnexpectedEof {
                invalid(self.path, "the GGUF header is cut short")
            } else {
                Error::io(format!("error reading {}", self.path.display()), err)
            }
        })
    }

    fn u32(&mut self) -> Result<u32> {
        let mut buf = [0u8; 4];
        self.bytes(&mut buf)?;
        Ok(u32::from_le_bytes(buf))
    }

    fn u64(&mut self) -> Result<u64> {
        let mut buf = [0u8; 8];
        self.bytes(&mut buf)?;
        Ok(u64::from_le_bytes(buf))
    }

    fn len(&mut self) -> Result<u64> {
        let len = self.u64()?;
        if len > GGUF_MAX_LEN {
            return Err(invalid(
                self.path,
                format!("the GGUF header claims a length of {len}"),
            ));
        }
        Ok(len)
    }

    fn string(&mut self) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; self.len()? as usize];
        self.bytes(&mut buf)?;
        Ok(buf)
    }

    fn skip(&mut self, n: u64) -> Result<()> {
        let copied = std::io::copy(&mut (&mut self.inner).take(n), &mut std::io::sink())
            .map_err(|err| Error::io(format!("error reading {}", self.path.display()), err))?;
        if copied < n {
            return Err(invalid(self.path, "the GGUF header is cut short"));
        }
        Ok(())
    }

    /// Skips a value of GGUF type `kind` (arrays nest at most once).
    fn skip_value(&mut self, kind: u32, depth: u32) -> Result<()> {
        match kind {
            0 | 1 | 7 => self.skip(1),
            2 | 3 => self.skip(2),
            4..=6 => self.skip(4),
            10..=12 => self.skip(8),
            8 => {
                let len = self.len()?;
                self.skip(len)
            }
            9 if depth == 0 => {
                let element = self.u32()?;
                let count = self.len()?;
                for _ in 0..count {
                    self.skip_value(element, depth + 1)?;
                }
                Ok(())
            }
            other => Err(invalid(
                self.path,
                format!("the GGUF header has a value of unknown type {other}"),
            )),
        }
    }
}

fn looks_like_safetensors(path: &Path, head: &[u8], len: u64) -> Result<bool> {
    let Some(size) = head.get(..8) else {
        return Ok(false);
    };
    let header_len = u64::from_le_bytes(size.try_into().expect("slice of eight bytes"));
    if !(2..=MAX_SAFETENSORS_HEADER).contains(&header_len) || header_len > len - 8 {
        return Ok(false);
    }
    if head.get(8) != Some(&b'{') {
        return Ok(false);
    }
    let mut header = vec![0u8; 8 + header_len as usize];
    let read = read_prefix(path, &mut header)?;
    if read != header.len() {
        return Ok(false);
    }
    Ok(serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&header[8..]).is_ok())
}

fn describe_magic(head: &[u8]) -> String {
    let shown: Vec<String> = head.iter().take(4).map(|b| format!("{b:02x}")).collect();
    format!("starts with bytes {}", shown.join(" "))
}
