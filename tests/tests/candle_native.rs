//! candle's own forward pass beyond the shared suite: the model's whole
//! trained context, past the 4096 positions of candle's quantized llama.

use conformance::workload::story_request;
use runtime_core::Error;

/// The demo model's trained context.
const TRAINED_CONTEXT: u32 = 8192;

/// candle's own forward pass serves the model's whole trained context: a
/// prompt past candle's quantized llama's 4096 positions is answered, and
/// one past the trained context is refused with the sizes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_trained_context_is_served_and_past_it_is_a_clear_error() {
    conformance::init_tracing();
    let backend = conformance::backends::candle();

    let too_big = backend
        .config
        .clone()
        .with_context_size(TRAINED_CONTEXT + 1);
    let err = (backend.new_runtime)()
        .initialize(too_big)
        .await
        .expect_err("a context past the model's is refused");
    assert!(
        matches!(&err, Error::InvalidConfig { .. }) && err.to_string().contains("8192"),
        "{err}"
    );

    let mut runtime = (backend.new_runtime)();
    runtime
        .initialize(
            backend
                .config
                .clone()
                .with_context_size(TRAINED_CONTEXT)
                .with_parallel(1),
        )
        .await
        .expect("candle starts with the trained context");
    assert_eq!(runtime.metadata().context_size, Some(TRAINED_CONTEXT));

    // About 4400 tokens of prompt: past 4096, within 8192.
    let answer = runtime
        .generate(story_request(0, 220, 8))
        .await
        .expect("a prompt past 4096 positions is answered");
    let usage = answer.usage.expect("usage");
    assert!(usage.prompt_tokens > 4096, "{}", usage.prompt_tokens);
    assert!(usage.completion_tokens > 0 && !answer.content.is_empty());

    // Past the trained context: refused before any work, with the sizes.
    let err = runtime
        .generate(story_request(1, 420, 8))
        .await
        .expect_err("a prompt past the context is refused");
    match err {
        Error::ContextExceeded {
            prompt_tokens,
            context_size,
        } => {
            assert_eq!(context_size, u64::from(TRAINED_CONTEXT));
            assert!(prompt_tokens > context_size);
        }
        other => panic!("expected ContextExceeded, got {other:?}"),
    }

    runtime.shutdown().await.unwrap();
}
