//! `cargo xtask demo`: provision the demo model and ask it a question with
//! `model-runtime run` on the embedded candle backend.

use crate::{Result, cargo, provision, run_checked, step, target_dir};

const QUESTION: &str = "What is the capital of France? Answer in one sentence.";

pub(crate) fn run(args: &[String]) -> Result {
    let question = if args.is_empty() {
        QUESTION.to_owned()
    } else {
        args.join(" ")
    };
    let model = provision::demo_model()?;
    let binary = target_dir().join("debug/model-runtime");
    if !binary.exists() {
        step(
            "building model-runtime; the first build compiles candle and takes a few minutes \
             on 2 cores (cargo shows its progress), later runs start at once",
        );
    } else {
        step("building model-runtime (up to date after the first build)");
    }
    // Built in its own step, not by `cargo run --quiet`, so the build shows.
    run_checked(cargo().args(["build", "-p", "runtime-cli", "--bin", "model-runtime"]))?;
    step(&format!(
        "model-runtime run {} --backend candle",
        model.display()
    ));
    run_checked(
        std::process::Command::new(&binary)
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
