//! `ModelFormat::detect` reads content, not just names.

use std::fs;
use std::path::{Path, PathBuf};

use runtime_core::{Error, ModelFormat};

/// The first 4 KiB of the SmolLM2 Q4_1 GGUF, in `tests/fixtures/`.
fn real_gguf_head() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gguf/smollm2-135m-instruct-q4_1.head.gguf")
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let path = dir.join(name);
    fs::write(&path, bytes).unwrap();
    path
}

fn forged_safetensors() -> Vec<u8> {
    let header = br#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&[0u8; 8]);
    bytes
}

#[test]
fn a_real_gguf_header_is_gguf() {
    let path = real_gguf_head();
    assert_eq!(ModelFormat::detect(path).unwrap(), ModelFormat::Gguf);
}

#[test]
fn gguf_is_recognised_whatever_the_file_is_called() {
    let dir = tempfile::tempdir().unwrap();
    let real = fs::read(real_gguf_head()).unwrap();
    let path = write(dir.path(), "weights.bin", &real);
    assert_eq!(ModelFormat::detect(path).unwrap(), ModelFormat::Gguf);
}

#[test]
fn a_forged_safetensors_file_is_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "model.safetensors", &forged_safetensors());
    assert_eq!(ModelFormat::detect(path).unwrap(), ModelFormat::Safetensors);
}

#[test]
fn a_hugging_face_directory_is_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "config.json", b"{}");
    write(dir.path(), "model.safetensors", &forged_safetensors());
    assert_eq!(
        ModelFormat::detect(dir.path()).unwrap(),
        ModelFormat::Safetensors
    );
}

#[test]
fn a_directory_without_weights_is_an_invalid_model() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "config.json", b"{}");
    let err = ModelFormat::detect(dir.path()).unwrap_err();
    assert!(
        matches!(err, Error::InvalidModel { ref reason, .. } if reason.contains("no *.safetensors"))
    );
}

#[test]
fn random_bytes_named_gguf_are_an_error_that_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let noise: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let path = write(dir.path(), "model.gguf", &noise);
    let err = ModelFormat::detect(&path).unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, Error::InvalidModel { .. }), "{err:?}");
    assert!(
        message.contains("the name says GGUF but the content is not"),
        "{message}"
    );
}

#[test]
fn an_empty_file_is_an_invalid_model() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "model.gguf", b"");
    assert!(matches!(
        ModelFormat::detect(path).unwrap_err(),
        Error::InvalidModel { ref reason, .. } if reason == "the file is empty"
    ));
}

#[test]
fn a_missing_path_is_model_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let err = ModelFormat::detect(dir.path().join("nope.gguf")).unwrap_err();
    assert!(matches!(err, Error::ModelNotFound { .. }));
}

#[test]
fn a_gguf_with_an_unknown_version_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = b"GGUF".to_vec();
    bytes.extend(99u32.to_le_bytes());
    let path = write(dir.path(), "m.gguf", &bytes);
    assert!(matches!(
        ModelFormat::detect(path).unwrap_err(),
        Error::InvalidModel { .. }
    ));
}

#[test]
fn formats_without_magic_are_taken_by_extension() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "model.onnx", &[0x08, 0x07, 0x12, 0x00]);
    assert_eq!(ModelFormat::detect(path).unwrap(), ModelFormat::Onnx);
    let legacy = write(dir.path(), "old.bin", b"tjgg\x01\x00\x00\x00");
    assert_eq!(ModelFormat::detect(legacy).unwrap(), ModelFormat::Ggml);
}

mod properties {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        #[test]
        fn detecting_arbitrary_bytes_never_panics(
            head in prop_oneof![
                Just(b"GGUF".to_vec()),
                Just(b"lmgg".to_vec()),
                Just(Vec::new()),
                prop::collection::vec(any::<u8>(), 8..9),
            ],
            body in prop::collection::vec(any::<u8>(), 0..256),
            ext in prop_oneof![Just("gguf"), Just("safetensors"), Just("bin"), Just("onnx"), Just("")],
        ) {
            let dir = tempfile::tempdir().unwrap();
            let name = if ext.is_empty() { "model".to_owned() } else { format!("model.{ext}") };
            let mut bytes = head;
            bytes.extend(body);
            let path = write(dir.path(), &name, &bytes);
            let _ = ModelFormat::detect(&path);
        }

        #[test]
        fn a_safetensors_header_length_cannot_make_detection_allocate_beyond_the_file(
            claimed in any::<u64>(),
            body in prop::collection::vec(any::<u8>(), 0..64),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let mut bytes = claimed.to_le_bytes().to_vec();
            bytes.push(b'{');
            bytes.extend(body);
            let path = write(dir.path(), "model.safetensors", &bytes);
            // A claimed length past the file is not credible: refused, not read.
            let _ = ModelFormat::detect(&path);
        }
    }
}

/// A whole GGUF header: `pairs` of (key, value bytes with their type).
fn gguf(pairs: &[(&str, u32, Vec<u8>)]) -> Vec<u8> {
    let mut bytes = b"GGUF".to_vec();
    bytes.extend_from_slice(&3u32.to_le_bytes());
    bytes.extend_from_slice(&0u64.to_le_bytes());
    bytes.extend_from_slice(&(pairs.len() as u64).to_le_bytes());
    for (key, kind, value) in pairs {
        bytes.extend_from_slice(&(key.len() as u64).to_le_bytes());
        bytes.extend_from_slice(key.as_bytes());
        bytes.extend_from_slice(&kind.to_le_bytes());
        bytes.extend_from_slice(value);
    }
    bytes
}

fn gguf_string(text: &str) -> Vec<u8> {
    let mut bytes = (text.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(text.as_bytes());
    bytes
}

#[test]
fn gguf_metadata_keys_are_found_past_arrays_and_scalars() {
    let mut tokens = 8u32.to_le_bytes().to_vec();
    tokens.extend_from_slice(&3u64.to_le_bytes());
    for token in ["<s>", "hello", "world"] {
        tokens.extend(gguf_string(token));
    }
    let bytes = gguf(&[
        ("general.architecture", 8, gguf_string("gemma3")),
        ("gemma3.block_count", 4, 18u32.to_le_bytes().to_vec()),
        ("tokenizer.ggml.tokens", 9, tokens),
        ("tokenizer.ggml.add_bos_token", 7, vec![1]),
        ("tokenizer.chat_template", 8, gguf_string("{{ messages }}")),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let with = write(dir.path(), "with.gguf", &bytes);
    assert!(runtime_core::gguf_has_metadata(&with, "tokenizer.chat_template").unwrap());
    assert!(runtime_core::gguf_has_metadata(&with, "tokenizer.ggml.add_bos_token").unwrap());
    let without = write(
        dir.path(),
        "without.gguf",
        &gguf(&[("general.architecture", 8, gguf_string("gemma3"))]),
    );
    assert!(!runtime_core::gguf_has_metadata(&without, "tokenizer.chat_template").unwrap());
}

#[test]
fn a_cut_or_foreign_gguf_header_is_an_invalid_model_not_a_missing_key() {
    // The real file's first 4 KiB: its first keys are there, the vocabulary
    // is cut off.
    assert!(runtime_core::gguf_has_metadata(real_gguf_head(), "general.architecture").unwrap());
    let cut = runtime_core::gguf_has_metadata(real_gguf_head(), "tokenizer.chat_template");
    assert!(matches!(cut, Err(Error::InvalidModel { .. })), "{cut:?}");
    let dir = tempfile::tempdir().unwrap();
    let other = write(dir.path(), "x.gguf", b"GGML\0\0\0\0");
    assert!(matches!(
        runtime_core::gguf_has_metadata(&other, "k"),
        Err(Error::InvalidModel { .. })
    ));
}

#[test]
fn an_architecture_with_a_pooling_type_is_an_embedding_model() {
    let dir = tempfile::tempdir().unwrap();
    let encoder = write(
        dir.path(),
        "bert.gguf",
        &gguf(&[
            ("general.architecture", 8, gguf_string("bert")),
            ("bert.pooling_type", 4, 1u32.to_le_bytes().to_vec()),
        ]),
    );
    assert!(runtime_core::is_embedding_model(&encoder).unwrap());
    // Another architecture's pooling key does not make this one an encoder.
    let decoder = write(
        dir.path(),
        "llama.gguf",
        &gguf(&[
            ("general.architecture", 8, gguf_string("llama")),
            ("bert.pooling_type", 4, 1u32.to_le_bytes().to_vec()),
        ]),
    );
    assert!(!runtime_core::is_embedding_model(&decoder).unwrap());
}

#[test]
fn a_sentence_transformers_directory_is_an_embedding_model_and_a_causal_lm_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let st = dir.path().join("st");
    fs::create_dir(&st).unwrap();
    write(
        &st,
        "modules.json",
        br#"[{"type": "sentence_transformers.models.Pooling"}]"#,
    );
    assert!(runtime_core::is_embedding_model(&st).unwrap());
    let bert = dir.path().join("bert");
    fs::create_dir(&bert).unwrap();
    write(&bert, "config.json", br#"{"architectures": ["BertModel"]}"#);
    assert!(runtime_core::is_embedding_model(&bert).unwrap());
    let lm = dir.path().join("lm");
    fs::create_dir(&lm).unwrap();
    write(
        &lm,
        "config.json",
        br#"{"architectures": ["LlamaForCausalLM"]}"#,
    );
    assert!(!runtime_core::is_embedding_model(&lm).unwrap());
    // A generative model whose architecture is named `…Model`.
    let glm = dir.path().join("glm");
    fs::create_dir(&glm).unwrap();
    write(
        &glm,
        "config.json",
        br#"{"architectures": ["ChatGLMModel"]}"#,
    );
    assert!(!runtime_core::is_embedding_model(&glm).unwrap());
}

#[test]
fn the_trained_context_is_read_for_the_files_architecture() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "bert.gguf",
        &gguf(&[
            ("llama.context_length", 4, 4096u32.to_le_bytes().to_vec()),
            ("general.architecture", 8, gguf_string("bert")),
            ("bert.context_length", 4, 512u32.to_le_bytes().to_vec()),
        ]),
    );
    assert_eq!(runtime_core::gguf_context_length(&path).unwrap(), Some(512));
    let without = write(
        dir.path(),
        "none.gguf",
        &gguf(&[("general.architecture", 8, gguf_string("bert"))]),
    );
    assert_eq!(runtime_core::gguf_context_length(&without).unwrap(), None);
}
