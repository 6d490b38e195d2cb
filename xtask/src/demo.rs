//! `cargo xtask demo`: provision the demo model and ask it a question with
//! `model-runtime run` on the embedded candle backend.

use crate::{Result, cargo, provision, run_checked};

const QUESTION: &str = "What is the capital of France? Answer in one sentence.";

pub(crate) fn run(args: &[String]) -> Result {
    let question = if args.is_empty() {
        QUESTION.to_owned()
    } else {
        args.join(" ")
    };
    let model = provision::demo_model()?;
    eprintln!("==> model-runtime run {} --backend candle", model.display());
    run_checked(
        cargo()
            .args([
                "run",
                "--quiet",
                "-p",
                "runtime-cli",
                "--bin",
                "model-runtime",
                "--",
            ])
            .arg("run")
            .arg(&model)
            .args([
                "--backend",
                "candle",
                "--temperature",
                "0",
                "--max-tokens",
                "96",
            ])
            .args(["--prompt", &question]),
    )
}
