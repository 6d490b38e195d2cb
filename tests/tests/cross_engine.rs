//! candle against llama-server on the same GGUF: the strongest correctness
//! checks we have. Needs both engines (`cargo xtask test-backends` provides them).

use conformance::backends::{candle, llamacpp};
use conformance::checks::start;
use conformance::identity::{self, PROMPTS, Step};
use runtime_candle::TextTokenizer;
use runtime_core::InferenceRequest;

/// Strings that trip tokenizers: scripts, emoji, digits, whitespace, specials.
const HARD_STRINGS: &[&str] = &[
    "Hello, world!",
    "What is the capital of France?",
    "東京は日本の首都です。",
    "مرحبا بالعالم",
    "שלום עולם",
    "🙂👍🏽🇫🇷 emoji and flags",
    "1234567890 and 3.14159",
    "tabs\tand\nnewlines\r\n  double  spaces",
    "<|im_start|>user\nhi<|im_end|>",
    "Ünïcödé façade naïve",
    "    leading spaces",
    "code: fn main() { println!(\"{}\", x); }",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenizer_matches_llama_server() {
    conformance::init_tracing();
    let llama = llamacpp();
    let tokenizer =
        TextTokenizer::from_gguf_file(&llama.config.model_path).expect("tokenizer from GGUF");
    let mut runtime = start(&llama).await;
    let http = reqwest::Client::new();
    let mut mismatches = Vec::new();
    for text in HARD_STRINGS {
        let response: serde_json::Value = http
            .post(format!("{}/tokenize", runtime.base_url()))
            .bearer_auth(conformance::bearer(runtime.as_ref()))
            .json(
                &serde_json::json!({"content": text, "add_special": false, "parse_special": true}),
            )
            .send()
            .await
            .expect("POST /tokenize")
            .json()
            .await
            .expect("tokens");
        let expected: Vec<u32> = response["tokens"]
            .as_array()
            .expect("a token list")
            .iter()
            .map(|t| t.as_u64().unwrap() as u32)
            .collect();
        let ours = tokenizer.encode(text).expect("encode");
        if ours != expected {
            mismatches.push(format!(
                "{text:?}: candle {ours:?} vs llama-server {expected:?}"
            ));
        }
    }
    runtime.shutdown().await.unwrap();
    assert!(
        mismatches.is_empty(),
        "tokenizations differ:\n{}",
        mismatches.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_output_matches_the_captured_llama_server_answer() {
    conformance::init_tracing();
    // fixtures/llama-server/chat.json: llama.cpp build 7e4c0a9, this model, this
    // question, temperature 0, 24 tokens.
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../fixtures/llama-server/chat.json"
    );
    let captured: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let expected = captured["choices"][0]["message"]["content"]
        .as_str()
        .unwrap();
    let mut runtime = start(&candle()).await;
    let request = InferenceRequest::from_prompt(PROMPTS[0])
        .with_max_tokens(24)
        .with_temperature(0.0);
    let answer = runtime.generate(request).await.expect("candle");
    runtime.shutdown().await.unwrap();
    assert_eq!(
        answer.content, expected,
        "candle's first 24 greedy tokens are llama.cpp's"
    );
    assert_eq!(
        answer.usage.unwrap().prompt_tokens,
        37,
        "the same prompt tokens as llama.cpp"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_tokens_match_llama_server_up_to_near_ties() {
    conformance::init_tracing();
    let mut llama = start(&llamacpp()).await;
    let http = reqwest::Client::new();
    let key = conformance::bearer(llama.as_ref());
    let mut reference = Vec::new();
    for prompt in PROMPTS {
        let rendered: serde_json::Value = http
            .post(format!("{}/apply-template", llama.base_url()))
            .bearer_auth(&key)
            .json(&serde_json::json!({"messages": [{"role": "user", "content": prompt}]}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let completion: serde_json::Value = http
            .post(format!("{}/completion", llama.base_url()))
            .bearer_auth(&key)
            .json(&serde_json::json!({
                "prompt": rendered["prompt"], "n_predict": 64, "temperature": 0,
                "n_probs": 2, "cache_prompt": false
            }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let steps: Vec<Step> = completion["completion_probabilities"]
            .as_array()
            .expect("per-token probabilities")
            .iter()
            .map(|step| {
                let top: Vec<f64> = step["top_logprobs"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter_map(|t| t["logprob"].as_f64())
                    .collect();
                Step::new(step["token"].as_str().unwrap_or_default(), &top)
            })
            .collect();
        reference.push(steps);
    }
    llama.shutdown().await.unwrap();

    let mut candle_runtime = start(&candle()).await;
    let mut answers = Vec::new();
    for prompt in PROMPTS {
        let request = InferenceRequest::from_prompt(*prompt)
            .with_max_tokens(64)
            .with_temperature(0.0);
        let answer = candle_runtime.generate(request).await.expect("candle");
        answers.push(answer.content);
    }
    candle_runtime.shutdown().await.unwrap();
    let cases = PROMPTS
        .iter()
        .zip(&reference)
        .zip(&answers)
        .map(|((prompt, steps), answer)| (*prompt, steps.as_slice(), answer.as_str()));
    match identity::check_all(cases) {
        Ok(report) => tracing::info!("identity with llama-server:\n{report}"),
        Err(failures) => panic!("{failures}"),
    }
}
