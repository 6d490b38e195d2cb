//! The forward pass on a tiny llama written on the fly: against candle's
//! quantized llama (an independent implementation), and against itself in
//! every batch shape, chunking and thread count.

use std::io::Cursor;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;

use std::path::Path;

use runtime_core::Error;

use super::*;
use crate::CacheType;

const EMBEDDING: usize = 64;
const FEED_FORWARD: usize = 128;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const LAYERS: usize = 2;
const VOCAB: usize = 96;
const CONTEXT: usize = 256;

/// Deterministic pseudo-random values in [-scale, scale].
fn values(seed: usize, len: usize, scale: f32) -> Vec<f32> {
    let mut state = (seed as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// A GGUF of a tiny llama: matrices in `matrix_type` (Q8_0 embeddings, as
/// the demo model has), F32 norms, the output tied to the embeddings.
fn tiny_gguf(matrix_type: GgmlDType) -> Vec<u8> {
    let head_dim = EMBEDDING / HEADS;
    let u32_value = |v: usize| gguf_file::Value::U32(v as u32);
    let metadata = [
        (
            "general.architecture",
            gguf_file::Value::String("llama".to_owned()),
        ),
        ("llama.block_count", u32_value(LAYERS)),
        ("llama.embedding_length", u32_value(EMBEDDING)),
        ("llama.feed_forward_length", u32_value(FEED_FORWARD)),
        ("llama.attention.head_count", u32_value(HEADS)),
        ("llama.attention.head_count_kv", u32_value(KV_HEADS)),
        ("llama.rope.dimension_count", u32_value(head_dim)),
        ("llama.context_length", u32_value(CONTEXT)),
        ("llama.vocab_size", u32_value(VOCAB)),
        ("llama.rope.freq_base", gguf_file::Value::F32(10_000.0)),
        (
            "llama.attention.layer_norm_rms_epsilon",
            gguf_file::Value::F32(1e-5),
        ),
    ];
    let tensor = |seed: usize, shape: &[usize], scale: f32, dtype: GgmlDType| {
        let len = shape.iter().product();
        let t = Tensor::from_vec(values(seed, len, scale), shape, &Device::Cpu).unwrap();
        QTensor::quantize(&t, dtype).unwrap()
    };
    let norm = |seed: usize| {
        let t = Tensor::from_vec(values(seed, EMBEDDING, 0.2), EMBEDDING, &Device::Cpu).unwrap();
        let ones = Tensor::ones(EMBEDDING, candle_core::DType::F32, &Device::Cpu).unwrap();
        QTensor::quantize(&(t + ones).unwrap(), GgmlDType::F32).unwrap()
    };
    let kv = KV_HEADS * head_dim;
    let mut tensors: Vec<(String, QTensor)> = vec![
        (
            "token_embd.weight".to_owned(),
            tensor(1, &[VOCAB, EMBEDDING], 1.0, GgmlDType::Q8_0),
        ),
        ("output_norm.weight".to_owned(), norm(2)),
    ];
    for layer in 0..LAYERS {
        let s = 10 * (layer + 1);
        let name = |t: &str| format!("blk.{layer}.{t}.weight");
        let scale = 0.15;
        tensors.extend([
            (name("attn_norm"), norm(s)),
            (
                name("attn_q"),
                tensor(s + 1, &[EMBEDDING, EMBEDDING], scale, matrix_type),
            ),
            (
                name("attn_k"),
                tensor(s + 2, &[kv, EMBEDDING], scale, matrix_type),
            ),
            (
                name("attn_v"),
                tensor(s + 3, &[kv, EMBEDDING], scale, matrix_type),
            ),
            (
                name("attn_output"),
                tensor(s + 4, &[EMBEDDING, EMBEDDING], scale, matrix_type),
            ),
            (name("ffn_norm"), norm(s + 5)),
            (
                name("ffn_gate"),
                tensor(s + 6, &[FEED_FORWARD, EMBEDDING], scale, matrix_type),
            ),
            (
                name("ffn_up"),
                tensor(s + 7, &[FEED_FORWARD, EMBEDDING], scale, matrix_type),
            ),
            (
                name("ffn_down"),
                tensor(s + 8, &[EMBEDDING, FEED_FORWARD], scale, matrix_type),
            ),
        ]);
    }
    let metadata: Vec<(&str, &gguf_file::Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut out = Cursor::new(Vec::new());
    gguf_file::write(&mut out, &metadata, &tensors).unwrap();
    out.into_inner()
}

fn load(bytes: &[u8]) -> std::result::Result<GgufLlama, Unsupported> {
    let mut reader = Cursor::new(bytes);
    let content = gguf_file::Content::read(&mut reader).unwrap();
    GgufLlama::load(&content, &mut reader, Path::new("tiny.gguf")).unwrap()
}

fn runner(model: &Arc<GgufLlama>, threads: usize) -> Forward {
    Forward::new(
        model.clone(),
        3,
        threads,
        CacheType::F16,
        Arc::new(AtomicBool::new(false)),
    )
    .unwrap()
}

fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (i * 37 + seed * 11 + 1) % VOCAB as u32)
        .collect()
}

fn step(slot: usize, position: usize, tokens: &[u32]) -> Step<'_> {
    Step {
        slot,
        position,
        tokens,
        logits: true,
    }
}

fn argmax(logits: &[f32]) -> usize {
    (0..logits.len())
        .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
        .unwrap()
}

#[test]
fn the_forward_pass_agrees_with_candles_quantized_llama() {
    for matrix_type in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
        let bytes = tiny_gguf(matrix_type);
        let model = Arc::new(load(&bytes).expect("the tiny model is covered"));
        // An f32 cache, as candle's.
        let stop = Arc::new(AtomicBool::new(false));
        let mut ours = Forward::new(model.clone(), 1, 2, CacheType::F32, stop).unwrap();
        let mut reader = Cursor::new(&bytes[..]);
        let content = gguf_file::Content::read(&mut reader).unwrap();
        let mut theirs = ModelWeights::from_gguf(content, &mut reader, &Device::Cpu).unwrap();

        let tokens = prompt(1, 12);
        let mut position = 0;
        let mut feed = tokens.clone();
        for _ in 0..6 {
            let got = ours.forward(&[step(0, position, &feed)]).unwrap().to_vec();
            let input = Tensor::new(feed.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let want: Vec<f32> = theirs
                .forward(&input, position)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec1()
                .unwrap();
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            let worst = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            // Q8_0 has one way to compute; candle's Q4_1 path keeps the
            // activations' `d·Σq` at another precision than llama.cpp's,
            // which we follow.
            let tolerance = if matrix_type == GgmlDType::Q8_0 {
                1e-5
            } else {
                1e-2
            };
            assert!(
                worst <= tolerance * scale,
                "{matrix_type:?} at {position}: logits differ by {worst} (scale {scale})"
            );
            assert_eq!(argmax(&got), argmax(&want), "{matrix_type:?} at {position}");
            position += feed.len();
            feed = vec![argmax(&got) as u32];
        }
    }
}

/// The logits of `tokens` generated greedily for `steps` after a prompt,
/// one sequence alone in slot 0.
fn alone(runner: &mut Forward, tokens: &[u32], steps: usize) -> Vec<Vec<f32>> {
    let mut out = vec![runner.forward(&[step(0, 0, tokens)]).unwrap().to_vec()];
    for position in tokens.len()..tokens.len() + steps {
        let next = [argmax(out.last().unwrap()) as u32];
        let logits = runner.forward(&[step(0, position, &next)]).unwrap();
        out.push(logits.to_vec());
    }
    out
}

#[test]
fn a_sequence_computes_the_same_bits_alone_in_a_batch_and_on_any_thread_count() {
    let model = Arc::new(load(&tiny_gguf(GgmlDType::Q4_1)).unwrap());
    let (a, b) = (prompt(1, 20), prompt(2, 9));
    let reference = alone(&mut runner(&model, 1), &a, 5);
    assert_eq!(
        alone(&mut runner(&model, 3), &a, 5),
        reference,
        "threads change the bits"
    );

    // A beside B: B's prompt and A's prompt in one batch, then both generating.
    let mut together = runner(&model, 2);
    let logits = together
        .forward(&[step(1, 0, &b), step(2, 0, &a)])
        .unwrap()
        .to_vec();
    let (b_logits, a_logits) = logits.split_at(VOCAB);
    assert_eq!(a_logits, &reference[0][..]);
    let mut next_a = [argmax(a_logits) as u32];
    let mut next_b = [argmax(b_logits) as u32];
    for i in 0..5 {
        let logits = together
            .forward(&[step(2, a.len() + i, &next_a), step(1, b.len() + i, &next_b)])
            .unwrap()
            .to_vec();
        assert_eq!(&logits[..VOCAB], &reference[i + 1][..], "step {i}");
        next_a = [argmax(&logits[..VOCAB]) as u32];
        next_b = [argmax(&logits[VOCAB..]) as u32];
    }
}

#[test]
fn a_prompt_read_in_chunks_gives_the_same_bits_as_read_whole() {
    let model = Arc::new(load(&tiny_gguf(GgmlDType::Q4_1)).unwrap());
    let tokens = prompt(3, 40);
    let whole = runner(&model, 2)
        .forward(&[step(0, 0, &tokens)])
        .unwrap()
        .to_vec();
    let mut chunked = runner(&model, 2);
    let mut position = 0;
    for chunk in tokens.chunks(7) {
        let last = position + chunk.len() == tokens.len();
        let logits = chunked
            .forward(&[Step {
                slot: 1,
                position,
                tokens: chunk,
                logits: last,
            }])
            .unwrap()
            .to_vec();
        assert_eq!(logits.len(), if last { VOCAB } else { 0 });
        if last {
            assert_eq!(logits, whole);
        }
        position += chunk.len();
    }
}

#[test]
fn a_slot_reused_from_position_zero_forgets_its_last_sequence() {
    let model = Arc::new(load(&tiny_gguf(GgmlDType::Q4_1)).unwrap());
    let mut runner = runner(&model, 2);
    let first = runner
        .forward(&[step(0, 0, &prompt(4, 15))])
        .unwrap()
        .to_vec();
    runner.forward(&[step(0, 0, &prompt(5, 30))]).unwrap();
    runner.release(0);
    assert_eq!(
        runner.forward(&[step(0, 0, &prompt(4, 15))]).unwrap(),
        &first[..]
    );
}

#[test]
fn steps_outside_the_context_the_vocabulary_or_the_slots_are_errors() {
    let model = Arc::new(load(&tiny_gguf(GgmlDType::Q4_1)).unwrap());
    let mut runner = runner(&model, 1);
    let past_context = vec![1u32; CONTEXT + 1];
    for bad in [
        vec![step(0, 0, &past_context)],
        vec![step(0, 0, &[VOCAB as u32])],
        vec![step(9, 0, &[1])],
        vec![step(0, 5, &[1])],
        vec![step(0, 0, &[1]), step(0, 0, &[2])],
        vec![step(0, 0, &[])],
    ] {
        let err = runner.forward(&bad).unwrap_err();
        assert!(matches!(err, Error::Engine { .. }), "{bad:?}: {err:?}");
    }
    // The runner is still usable.
    assert_eq!(runner.forward(&[step(0, 0, &[1, 2])]).unwrap().len(), VOCAB);
}

#[test]
fn a_stop_ends_the_forward_pass_with_shut_down() {
    let model = Arc::new(load(&tiny_gguf(GgmlDType::Q4_1)).unwrap());
    let stop = Arc::new(AtomicBool::new(true));
    let mut runner = Forward::new(model, 1, 1, CacheType::F16, stop).unwrap();
    let err = runner.forward(&[step(0, 0, &[1, 2, 3])]).unwrap_err();
    assert!(matches!(err, Error::ShutDown), "{err:?}");
}

#[test]
fn a_model_with_tensor_types_the_kernels_lack_is_left_to_candle() {
    let Err(Unsupported(reason)) = load(&tiny_gguf(GgmlDType::Q4_0)) else {
        panic!("a Q4_0 model was taken");
    };
    assert!(reason.contains("Q4_0"), "{reason}");
}
