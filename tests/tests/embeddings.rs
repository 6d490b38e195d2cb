//! Embeddings on every engine: all-MiniLM-L6-v2 on candle (its
//! sentence-transformers directory), llama.cpp (its GGUF conversion, f32)
//! and vLLM (the directory), each against the others and against vectors
//! the reference implementation computes in the test (transformers' BERT,
//! mean pooling over the attention mask, L2 normalisation), and through the
//! gateway over HTTP. Needs all three engines (`cargo xtask test-backends`
//! provides them and the model).
//!
//! The three engines are started once for the suite and stopped at its end,
//! when it also proves that no engine process is left.

#![allow(
    clippy::print_stderr,
    reason = "the suite reports the agreement it measured on stderr, as libtest reports"
)]

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;

use conformance::Backend;
use conformance::backends::{EMBEDDING_CONTEXT, EMBEDDING_DIR_ENV, embedding_backends};
use conformance::checks::{assert_no_engine_left, chain, start_with};
use futures::FutureExt;
use libtest_mimic::{Arguments, Failed, Trial};
use runtime_core::{
    EmbeddingInput, EmbeddingRequest, Embeddings, Error, ModelRuntime, cosine_similarity,
};
use serde_json::{Value, json};

/// The context every engine is started with.
const CONTEXT: u32 = EMBEDDING_CONTEXT;
/// The agreement the issue asks of any two implementations of one model.
const AGREEMENT: f64 = 0.999;

/// Nineteen varied texts; the twentieth is [`long_text`].
const TEXTS: [&str; 19] = [
    "Hello, world!",
    "The capital of France is Paris.",
    "a",
    "東京は日本の首都です。",
    "北京是中华人民共和国的首都。",
    "서울은 대한민국의 수도입니다.",
    "مرحبا بالعالم، كيف حالك اليوم؟",
    "שלום עולם",
    "🙂👍🏽🇫🇷 emoji, skin tones and flags 🚀",
    "1234567890 and 3.14159 and 2^64 = 18446744073709551616",
    "fn main() { println!(\"{}\", x.iter().sum::<u32>()); }",
    "tabs\tand\nnewlines\r\n  and   runs    of     spaces",
    "Ünïcödé façade naïve café résumé",
    "UPPER CASE and lower case and MiXeD cAsE",
    "https://example.com/path?query=1&other=two#fragment",
    "A sentence about machine learning, embeddings and retrieval-augmented generation.",
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.",
    "Привет, мир! Как дела?",
    "?!.,;:'\"()[]{}<>@#$%^&*-_=+|\\/~`",
];

/// A text of exactly [`CONTEXT`] tokens with the model's `[CLS]` and `[SEP]`.
fn long_text() -> String {
    vec!["word"; CONTEXT as usize - 2].join(" ")
}

/// The twenty texts.
fn texts() -> Vec<String> {
    TEXTS
        .iter()
        .map(|t| (*t).to_owned())
        .chain([long_text()])
        .collect()
}

/// One engine with the embedding model loaded.
struct Engine {
    backend: Backend,
    runtime: Box<dyn ModelRuntime>,
}

impl Engine {
    fn name(&self) -> &'static str {
        self.backend.name
    }

    async fn embed(&self, request: EmbeddingRequest) -> Embeddings {
        self.runtime
            .embed(request)
            .await
            .unwrap_or_else(|err| panic!("{} embeds: {}", self.name(), chain(&err)))
    }
}

/// What the reference computes for [`texts`].
struct Reference {
    vectors: Vec<Vec<f32>>,
    /// The model's own tokenizer's ids, special tokens included.
    tokens: Vec<Vec<u32>>,
}

/// The engines, and the reference's answers for [`texts`].
struct Engines {
    all: Vec<Engine>,
    reference: Reference,
}

/// Texts an engine's tokenizer splits otherwise than the model's own
/// tokenizer does, as found here; each is checked to still diverge, so a
/// fixed engine fails the suite until its entry is removed.
const KNOWN_TOKENIZER_DIVERGENCES: &[(&str, &str, &str)] = &[(
    "llamacpp",
    "서울은 대한민국의 수도입니다.",
    "llama.cpp's WordPiece tokenizer decomposes Hangul syllables as BERT's accent \
     stripping does, then drops the vowel and final jamo that transformers keeps \
     (the class of ggml-org/llama.cpp#5496)",
)];

fn known_divergence(engine: &str, text: &str) -> bool {
    KNOWN_TOKENIZER_DIVERGENCES
        .iter()
        .any(|(e, t, _)| *e == engine && *t == text)
}

impl Engines {
    /// `engine`'s inputs for [`texts`]: each text, or, where the engine's
    /// tokenizer is known to split it wrongly, the reference's tokens, so
    /// the engine's model is compared, not its tokenizer.
    fn inputs_for(&self, engine: &Engine) -> Vec<EmbeddingInput> {
        texts()
            .into_iter()
            .zip(&self.reference.tokens)
            .map(|(text, tokens)| {
                if known_divergence(engine.name(), &text) {
                    EmbeddingInput::Tokens(tokens.clone())
                } else {
                    EmbeddingInput::Text(text)
                }
            })
            .collect()
    }
}

impl Engines {
    async fn start() -> Self {
        let reference = reference_vectors(&texts()).await;
        let mut all = Vec::new();
        for backend in embedding_backends() {
            let runtime = start_with(&backend, backend.config.clone()).await;
            all.push(Engine { backend, runtime });
        }
        Self { all, reference }
    }

    async fn stop(self) -> Result<(), String> {
        for mut engine in self.all {
            engine
                .runtime
                .shutdown()
                .await
                .map_err(|err| format!("{} stops: {}", engine.name(), chain(&err)))?;
            drop(engine.runtime);
            assert_no_engine_left(&engine.backend).await;
        }
        Ok(())
    }
}

/// What transformers computes for `texts`, by the provisioned vLLM
/// environment's Python (which has torch and transformers).
async fn reference_vectors(texts: &[String]) -> Reference {
    let python = conformance::required_env(runtime_vllm::PYTHON_ENV);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("reference/embeddings.py");
    let mut child = tokio::process::Command::new(python)
        .arg(script)
        .arg(conformance::required_env(EMBEDDING_DIR_ENV))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the reference script starts");
    let mut stdin = child.stdin.take().expect("a stdin");
    let input = serde_json::to_vec(texts).unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stdin, &input)
        .await
        .expect("texts written to the reference");
    drop(stdin);
    let output = child.wait_with_output().await.expect("the reference ends");
    assert!(
        output.status.success(),
        "the reference failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let answer: Value = serde_json::from_slice(&output.stdout).expect("the reference's answer");
    let lists = |key: &str| -> Vec<Vec<Value>> {
        serde_json::from_value(answer[key].clone()).unwrap_or_else(|err| panic!("{key}: {err}"))
    };
    Reference {
        vectors: lists("vectors")
            .iter()
            .map(|v| v.iter().map(|x| x.as_f64().unwrap() as f32).collect())
            .collect(),
        tokens: lists("tokens")
            .iter()
            .map(|v| v.iter().map(|x| x.as_u64().unwrap() as u32).collect())
            .collect(),
    }
}

/// The lowest cosine between `a[i]` and `b[i]`, and its index.
fn lowest_cosine(a: &[Vec<f32>], b: &[Vec<f32>]) -> (f64, usize) {
    assert_eq!(a.len(), b.len(), "as many vectors on both sides");
    a.iter()
        .zip(b)
        .map(|(x, y)| cosine_similarity(x, y))
        .enumerate()
        .map(|(i, c)| (c, i))
        .fold(
            (f64::MAX, 0),
            |low, next| if next.0 < low.0 { next } else { low },
        )
}

type CheckFn = fn(Arc<Engines>) -> Pin<Box<dyn Future<Output = ()>>>;

const CHECKS: &[(&str, CheckFn)] = &[
    (
        "every_engine_embeds_twenty_texts_as_the_reference_does",
        |e| Box::pin(every_engine_embeds_twenty_texts_as_the_reference_does(e)),
    ),
    ("every_two_engines_agree_on_twenty_texts", |e| {
        Box::pin(every_two_engines_agree_on_twenty_texts(e))
    }),
    ("a_batch_of_32_equals_32_single_calls", |e| {
        Box::pin(a_batch_of_32_equals_32_single_calls(e))
    }),
    (
        "an_input_past_the_context_is_refused_or_truncated_as_asked",
        |e| {
            Box::pin(an_input_past_the_context_is_refused_or_truncated_as_asked(
                e,
            ))
        },
    ),
    ("empty_inputs_and_other_widths_are_refused_by_name", |e| {
        Box::pin(empty_inputs_and_other_widths_are_refused_by_name(e))
    }),
    (
        "the_gateway_serves_embeddings_and_refuses_chat_for_an_embedding_model",
        |e| Box::pin(the_gateway_serves_embeddings_and_refuses_chat_for_an_embedding_model(e)),
    ),
];

async fn every_engine_embeds_twenty_texts_as_the_reference_does(engines: Arc<Engines>) {
    let texts = texts();
    let mut failures = Vec::new();
    for engine in &engines.all {
        // Each engine's tokenizer against the model's own: a divergence is
        // allowed only where it is known (and must still be there).
        for (text, expected) in texts.iter().zip(&engines.reference.tokens) {
            let tokens = engine.runtime.tokenize(text, true).await.unwrap();
            let known = known_divergence(engine.name(), text);
            match (tokens == *expected, known) {
                (true, false) | (false, true) => {}
                (false, false) => failures.push(format!(
                    "{}: tokenizes {text:?} as {tokens:?}, the model's tokenizer as {expected:?}",
                    engine.name()
                )),
                (true, true) => failures.push(format!(
                    "{}: now tokenizes {text:?} as the model does; remove it from \
                     KNOWN_TOKENIZER_DIVERGENCES",
                    engine.name()
                )),
            }
        }
        // The long text is the context exactly.
        let long = engine.runtime.tokenize(&long_text(), true).await.unwrap();
        assert_eq!(long.len(), CONTEXT as usize, "{}", engine.name());
        let vectors = engine
            .embed(EmbeddingRequest::new(engines.inputs_for(engine)))
            .await;
        assert!(
            vectors.vectors.iter().all(|v| v.len() == 384),
            "{}: 384-dimensional vectors",
            engine.name()
        );
        let (low, at) = lowest_cosine(&vectors.vectors, &engines.reference.vectors);
        tracing::info!(
            engine = engine.name(),
            lowest = low,
            text = at,
            "against the reference"
        );
        eprintln!(
            "{}: lowest cosine to the reference {low:.6} (text {at})",
            engine.name()
        );
        if low < AGREEMENT {
            failures.push(format!(
                "{}: cosine {low:.6} to the reference on {:?}",
                engine.name(),
                texts[at]
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

async fn every_two_engines_agree_on_twenty_texts(engines: Arc<Engines>) {
    let texts = texts();
    let mut vectors = Vec::new();
    for engine in &engines.all {
        let inputs = engines.inputs_for(engine);
        vectors.push(engine.embed(EmbeddingRequest::new(inputs)).await.vectors);
    }
    let mut failures = Vec::new();
    for i in 0..engines.all.len() {
        for j in i + 1..engines.all.len() {
            let (low, at) = lowest_cosine(&vectors[i], &vectors[j]);
            let pair = format!("{} and {}", engines.all[i].name(), engines.all[j].name());
            eprintln!("{pair}: lowest cosine {low:.6} (text {at})");
            if low < AGREEMENT {
                failures.push(format!("{pair}: cosine {low:.6} on {:?}", texts[at]));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// How close a vector computed in a batch must be to the same input's
/// vector computed alone: what float32 arithmetic in another order (other
/// padding, other matrix shapes) moves, and no more. Measured here: the
/// engines' lowest cosine between the two is above 1 - 1e-6.
const SAME_VECTOR: f64 = 1.0 - 1e-5;

async fn a_batch_of_32_equals_32_single_calls(engines: Arc<Engines>) {
    let inputs: Vec<String> = (0..32)
        .map(|i| format!("{i}: {}", TEXTS[i % TEXTS.len()]))
        .collect();
    let mut failures = Vec::new();
    for engine in &engines.all {
        let batch = engine.embed(EmbeddingRequest::new(inputs.clone())).await;
        let mut singles = Vec::new();
        let mut tokens = 0;
        for input in &inputs {
            let one = engine.embed(EmbeddingRequest::new([input.as_str()])).await;
            tokens += one.prompt_tokens;
            singles.extend(one.vectors);
        }
        let (low, at) = lowest_cosine(&batch.vectors, &singles);
        eprintln!(
            "{}: batch against single calls, lowest cosine {low:.9}",
            engine.name()
        );
        if low < SAME_VECTOR {
            failures.push(format!(
                "{}: input {at} has cosine {low:.9} between its batched and single vectors",
                engine.name()
            ));
        }
        if batch.prompt_tokens != tokens {
            failures.push(format!(
                "{}: the batch counts {} tokens, the single calls {tokens}",
                engine.name(),
                batch.prompt_tokens
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

async fn an_input_past_the_context_is_refused_or_truncated_as_asked(engines: Arc<Engines>) {
    // 600 words: past the context; cut to it, it is the long text exactly.
    let over = vec!["word"; 600].join(" ");
    for engine in &engines.all {
        let refused = engine
            .runtime
            .embed(EmbeddingRequest::new([over.as_str()]))
            .await;
        match refused {
            Err(Error::ContextExceeded {
                prompt_tokens,
                context_size,
            }) => {
                assert_eq!(context_size, u64::from(CONTEXT), "{}", engine.name());
                assert_eq!(prompt_tokens, 602, "{}: [CLS] + 600 + [SEP]", engine.name());
            }
            other => panic!("{}: {over:.20}… was not refused: {other:?}", engine.name()),
        }
        let cut = engine
            .embed(EmbeddingRequest::new([over.as_str()]).with_truncate(true))
            .await;
        assert_eq!(cut.prompt_tokens, u64::from(CONTEXT), "{}", engine.name());
        let exact = engine.embed(EmbeddingRequest::new([long_text()])).await;
        let same = cosine_similarity(&cut.vectors[0], &exact.vectors[0]);
        assert!(
            same >= SAME_VECTOR,
            "{}: the cut input is not the text of its first {CONTEXT} tokens (cosine {same})",
            engine.name()
        );
        // Token ids past the context are refused too, and cut when asked.
        let word = engine.runtime.tokenize("word", false).await.unwrap();
        let ids: Vec<u32> = word.iter().copied().cycle().take(600).collect();
        assert!(matches!(
            engine
                .runtime
                .embed(EmbeddingRequest::new([EmbeddingInput::Tokens(ids.clone())]))
                .await,
            Err(Error::ContextExceeded { .. })
        ));
        let cut_ids = engine
            .embed(EmbeddingRequest::new([EmbeddingInput::Tokens(ids)]).with_truncate(true))
            .await;
        assert_eq!(
            cut_ids.prompt_tokens,
            u64::from(CONTEXT),
            "{}",
            engine.name()
        );
    }
}

async fn empty_inputs_and_other_widths_are_refused_by_name(engines: Arc<Engines>) {
    for engine in &engines.all {
        for (request, field) in [
            (EmbeddingRequest::new([""]), "input"),
            (EmbeddingRequest::new(["a", ""]), "input"),
            (
                EmbeddingRequest::new(["a"]).with_dimensions(128),
                "dimensions",
            ),
        ] {
            match engine.runtime.embed(request).await {
                Err(Error::InvalidRequest { field: named, .. }) => {
                    assert_eq!(named, field, "{}", engine.name());
                }
                other => panic!("{}: `{field}` not refused: {other:?}", engine.name()),
            }
        }
        let own_width = engine
            .embed(EmbeddingRequest::new(["a"]).with_dimensions(384))
            .await;
        assert_eq!(own_width.vectors[0].len(), 384);
    }
}

async fn the_gateway_serves_embeddings_and_refuses_chat_for_an_embedding_model(
    engines: Arc<Engines>,
) {
    let http = reqwest::Client::new();
    // The gateway starts its own engine of each kind (candle and llama.cpp
    // start in seconds); vLLM's is the suite's, compared with below.
    for backend in embedding_backends()
        .into_iter()
        .filter(|b| ["candle", "llamacpp"].contains(&b.name))
    {
        let before = conformance::checks::own_engine_processes(&backend);
        let (manager, chat_url, server) =
            conformance::gateway::start(&backend, backend.config.clone()).await;
        let base = chat_url.trim_end_matches("/v1/chat/completions").to_owned();
        let post = |path: &str, body: Value| http.post(format!("{base}{path}")).json(&body).send();
        let texts = ["Hello, world!", "東京は日本の首都です。"];
        let floats: Value = post(
            "/v1/embeddings",
            json!({"model": "conformance", "input": texts}),
        )
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
        let base64: Value = post(
            "/v1/embeddings",
            json!({"model": "conformance", "input": texts, "encoding_format": "base64"}),
        )
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
        let floats: runtime_openai::embeddings::EmbeddingsResponse =
            serde_json::from_value(floats).expect("an embeddings answer");
        let base64: runtime_openai::embeddings::EmbeddingsResponse =
            serde_json::from_value(base64).expect("an embeddings answer");
        assert!(base64.data[0].embedding.is_string(), "base64 is a string");
        let floats = floats.into_embeddings(2).unwrap();
        let base64 = base64.into_embeddings(2).unwrap();
        assert_eq!(
            floats, base64,
            "{}: base64 carries the same floats",
            backend.name
        );
        assert!(floats.prompt_tokens > 0);
        let suite_engine = engines
            .all
            .iter()
            .find(|e| e.name() == backend.name)
            .expect("the suite runs this engine");
        let direct = suite_engine.embed(EmbeddingRequest::new(texts)).await;
        let (low, _) = lowest_cosine(&floats.vectors, &direct.vectors);
        assert!(low >= SAME_VECTOR, "{}: gateway {low}", backend.name);

        // Chat and completions are refused, naming where to go instead.
        for (path, body) in [
            (
                "/v1/chat/completions",
                json!({"model": "conformance", "messages": [{"role": "user", "content": "hi"}]}),
            ),
            (
                "/v1/completions",
                json!({"model": "conformance", "prompt": "hi"}),
            ),
        ] {
            let response = post(path, body).await.unwrap();
            let status = response.status().as_u16();
            let text = response.text().await.unwrap();
            assert_eq!(status, 501, "{}: {path}: {text}", backend.name);
            assert!(
                text.contains("/v1/embeddings"),
                "{}: {path}: {text}",
                backend.name
            );
        }
        let models: Value = http
            .get(format!("{base}/v1/models"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            models["data"][0]["endpoints"],
            json!(["/v1/embeddings"]),
            "{}: {models}",
            backend.name
        );
        let metrics = http
            .get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            metrics.contains(
                r#"gateway_embedding_requests_total{model="conformance",status="200"} 2"#
            ),
            "{}: {metrics}",
            backend.name
        );
        manager
            .shutdown_within(std::time::Duration::from_secs(5))
            .await;
        drop(manager);
        server.abort();
        let _ = server.await;
        // The gateway's engine is gone; the suite's own engine stays.
        let started: Vec<i32> = conformance::checks::own_engine_processes(&backend)
            .iter()
            .filter(|p| !before.iter().any(|b| b.pid == p.pid))
            .map(|p| p.pid)
            .collect();
        let left = conformance::procs::wait_gone(&started, std::time::Duration::from_secs(5)).await;
        assert!(
            left.is_empty(),
            "{}: the gateway left {left:?} running",
            backend.name
        );
    }
}

fn main() -> ExitCode {
    conformance::init_tracing();
    let mut arguments = Arguments::from_args();
    // One at a time: the leak checks look for any engine.
    arguments.test_threads = Some(1);
    if arguments.list {
        let trials = CHECKS
            .iter()
            .map(|(name, _)| Trial::test(*name, || Ok(())))
            .collect();
        return libtest_mimic::run(&arguments, trials).exit_code();
    }
    let async_runtime = Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("an async runtime for the suite"),
    );
    let engines = Arc::new(async_runtime.block_on(Engines::start()));
    let trials = CHECKS
        .iter()
        .map(|(name, check)| {
            let (check, engines, async_runtime) = (*check, engines.clone(), async_runtime.clone());
            Trial::test(*name, move || {
                let bounded = async move {
                    tokio::time::timeout(conformance::CHECK_TIMEOUT, check(engines)).await
                };
                match async_runtime.block_on(AssertUnwindSafe(bounded).catch_unwind()) {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(_)) => Err(Failed::from(format!(
                        "{name} did not finish within {:?}",
                        conformance::CHECK_TIMEOUT
                    ))),
                    Err(payload) => {
                        Err(Failed::from(conformance::harness::panic_message(&*payload)))
                    }
                }
            })
        })
        .collect();
    let conclusion = libtest_mimic::run(&arguments, trials);
    let engines = Arc::try_unwrap(engines)
        .ok()
        .expect("no check holds the engines any more");
    let stopped = async_runtime.block_on(engines.stop());
    if let Err(message) = &stopped {
        eprintln!("error: {message}");
    }
    if conclusion.has_failed() || stopped.is_err() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
