//! candle on the Hugging Face copy of the model (config.json, tokenizer.json,
//! the chat template, bf16 safetensors) against vLLM on the same directory:
//! the end-to-end check of candle's safetensors loader. Needs candle and vLLM
//! (`cargo xtask test-backends` provides both).
//!
//! vLLM scores candle's answers token by token (`prompt_logprobs` over the
//! chat-templated prompt followed by the answer), so every token is checked
//! against the reference's own choice after the same prefix, not only the
//! tokens before the first near tie.

use conformance::backends::{CONTEXT_SIZE, vllm};
use conformance::checks::start;
use conformance::identity::{self, PROMPTS, Scored};
use runtime_candle::CandleRuntime;
use runtime_core::{FinishReason, InferenceRequest, ModelRuntime, RuntimeConfig};
use serde_json::{Value, json};

/// Tokens generated per prompt.
const ANSWER_TOKENS: u32 = 48;

/// The SmolLM2 chat template's end-of-turn token, which ends a stopped answer.
const END_OF_TURN: &str = "<|im_end|>";

/// A running vLLM and what it takes to call its HTTP API directly.
struct Reference<'a> {
    http: reqwest::Client,
    engine: &'a dyn ModelRuntime,
    model: String,
}

impl Reference<'_> {
    async fn post(&self, path: &str, mut body: Value) -> Value {
        body["model"] = json!(self.model);
        let response = self
            .http
            .post(format!("{}{path}", self.engine.base_url()))
            .bearer_auth(conformance::bearer(self.engine))
            .json(&body)
            .send()
            .await
            .unwrap_or_else(|err| panic!("POST {path}: {err}"));
        let status = response.status();
        let body: Value = response.json().await.expect("a JSON answer");
        assert!(status.is_success(), "POST {path}: {status} {body}");
        body
    }

    async fn tokens(&self, body: Value) -> Vec<u64> {
        self.post("/tokenize", body).await["tokens"]
            .as_array()
            .expect("tokens")
            .iter()
            .map(|t| t.as_u64().expect("a token id"))
            .collect()
    }

    /// How vLLM rates each token of `answer` after the templated `prompt`.
    async fn score(&self, prompt: &str, answer: &str, stopped: bool) -> Vec<Scored> {
        let prefix = self
            .tokens(json!({
                "messages": [{"role": "user", "content": prompt}],
                "add_generation_prompt": true,
            }))
            .await;
        let mut text = answer.to_owned();
        if stopped {
            text.push_str(END_OF_TURN);
        }
        let answer_ids = self
            .tokens(json!({"prompt": text, "add_special_tokens": false}))
            .await;
        let all: Vec<u64> = prefix.iter().chain(&answer_ids).copied().collect();
        let scored = self
            .post(
                "/v1/completions",
                json!({"prompt": all, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 1}),
            )
            .await;
        let per_token = scored["choices"][0]["prompt_logprobs"]
            .as_array()
            .unwrap_or_else(|| panic!("prompt_logprobs in {scored}"));
        answer_ids
            .iter()
            .zip(&per_token[prefix.len()..])
            .map(|(id, candidates)| {
                let candidates = candidates.as_object().expect("candidates by token id");
                let logprob = |entry: &Value| entry["logprob"].as_f64().expect("a logprob");
                let chosen = &candidates[&id.to_string()];
                let best = candidates.values().map(logprob).fold(f64::MIN, f64::max);
                Scored {
                    text: chosen["decoded_token"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                    deficit: best - logprob(chosen),
                }
            })
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn candle_on_safetensors_picks_vllms_tokens_up_to_near_ties() {
    conformance::init_tracing();
    let mut backend = vllm();
    let model_dir = backend.config.model_path.clone();

    let mut candle = CandleRuntime::new();
    candle
        .initialize(
            RuntimeConfig::new(&model_dir)
                .with_context_size(CONTEXT_SIZE)
                .with_threads(2),
        )
        .await
        .expect("candle loads the safetensors directory");
    let mut answers = Vec::new();
    for prompt in PROMPTS {
        let request = InferenceRequest::from_prompt(*prompt)
            .with_max_tokens(ANSWER_TOKENS)
            .with_temperature(0.0);
        let answer = candle.generate(request).await.expect("candle answers");
        answers.push((
            answer.content,
            answer.finish_reason == Some(FinishReason::Stop),
        ));
    }
    candle.shutdown().await.expect("candle stops");

    // candle computes in f32 from the bf16 weights; so does vLLM with this.
    backend.config = backend.config.with_extra_config("dtype", "float32");
    let mut engine = start(&backend).await;
    let reference = Reference {
        http: reqwest::Client::new(),
        engine: engine.as_ref(),
        model: backend.config.model_name(),
    };
    let mut scores = Vec::new();
    for (prompt, (answer, stopped)) in PROMPTS.iter().zip(&answers) {
        scores.push(reference.score(prompt, answer, *stopped).await);
    }
    engine.shutdown().await.expect("vLLM stops");

    let cases = PROMPTS
        .iter()
        .zip(&scores)
        .map(|(prompt, scored)| (*prompt, scored.as_slice()));
    match identity::check_scored(cases) {
        Ok(report) => tracing::info!("candle (safetensors) scored by vLLM:\n{report}"),
        Err(failures) => panic!("{failures}"),
    }
    conformance::checks::assert_no_engine_left(&backend).await;
}
