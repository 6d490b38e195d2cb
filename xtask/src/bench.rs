//! `cargo xtask bench [TARGET...]`: the benchmarks, built with optimisations,
//! against the provisioned engines.

use crate::{Result, cargo, run_checked, step, test_backends};

/// What can be benchmarked: each backend, and the gateway over several models.
const TARGETS: &[&str] = &["llamacpp", "candle", "vllm", "gateway"];

/// The engines a target needs: candle and the gateway are compared with, or
/// run, llama-server too.
fn engines_of(target: &str) -> &'static [&'static str] {
    match target {
        "candle" | "gateway" => &["candle", "llamacpp"],
        "llamacpp" => &["llamacpp"],
        "vllm" => &["vllm"],
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
    let env = test_backends::provision_for(&engines)?;
    for target in targets {
        step(&format!("bench: {target}"));
        run_checked(
            cargo()
                .args([
                    "run",
                    "--release",
                    "--quiet",
                    "-p",
                    "conformance",
                    "--bin",
                    "bench",
                    "--",
                ])
                .arg(target)
                .envs(env.iter().cloned()),
        )?;
    }
    Ok(())
}
