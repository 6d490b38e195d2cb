//! `cargo xtask bench [TARGET...]`: the benchmarks, built with optimisations,
//! against the provisioned engines; then the report of every target's last
//! results, `target/bench/report.md` with its SVG charts.

use crate::{Result, cargo, run_checked, step, target_dir, test_backends};

/// What can be benchmarked: candle against llama.cpp, each server backend,
/// the gateway over several models, the distributed setups, and structured
/// answers against free ones, and candle's encoder against llama-server's
/// embeddings.
const TARGETS: &[&str] = &[
    "candle",
    "llamacpp",
    "vllm",
    "gateway",
    "distributed",
    "structured",
    "embeddings",
];

/// The engines a target needs: candle and the gateway are compared with, or
/// run, llama-server too.
fn engines_of(target: &str) -> &'static [&'static str] {
    match target {
        "candle" | "gateway" | "structured" => &["candle", "llamacpp"],
        "llamacpp" | "distributed" => &["llamacpp"],
        "vllm" => &["vllm"],
        // The embedding model's GGUF is converted with vLLM's Python.
        "embeddings" => &["candle", "llamacpp", "vllm"],
        _ => &[],
    }
}

pub(crate) fn run(args: &[String]) -> Result {
    let targets: Vec<&str> = if args.is_empty() {
        TARGETS.to_vec()
    } else {
        args.iter()
            .map(|arg| {
                TARGETS
                    .iter()
                    .find(|t| **t == arg.as_str())
                    .copied()
                    .ok_or_else(|| {
                        format!(
                            "unknown bench target `{arg}`; known: {}",
                            TARGETS.join(", ")
                        )
                    })
            })
            .collect::<Result<_>>()?
    };
    let mut engines: Vec<&str> = Vec::new();
    for engine in targets.iter().flat_map(|t| engines_of(t)) {
        if !engines.contains(engine) {
            engines.push(engine);
        }
    }
    let mut env = test_backends::provision_for(&engines)?;
    let dir = target_dir().join("bench");
    env.push(("MODEL_RUNTIME_BENCH_DIR".into(), dir.clone().into()));
    for target in targets {
        step(&format!("bench: {target}"));
        run_checked(
            cargo()
                .args([
                    "run",
                    "--release",
                    "--quiet",
                    "-p",
                    "bench",
                    "--bin",
                    "bench",
                    "--",
                ])
                .arg(target)
                .envs(env.iter().cloned()),
        )?;
    }
    step(&format!("report: {}", dir.join("report.md").display()));
    Ok(())
}
