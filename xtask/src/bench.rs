//! `cargo xtask bench [BACKEND...]`: the benchmarks, built with optimisations,
//! against the provisioned engines.

use crate::{Result, cargo, run_checked, test_backends};

pub(crate) fn run(args: &[String]) -> Result {
    let backends = test_backends::select(args)?;
    // candle's benchmark compares against llama-server on the same model.
    let mut engines = backends.clone();
    if engines.contains(&"candle") && !engines.contains(&"llamacpp") {
        engines.push("llamacpp");
    }
    let env = test_backends::provision_for(&engines)?;
    for backend in backends {
        eprintln!("==> bench: {backend}");
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
                .arg(backend)
                .envs(env.iter().cloned()),
        )?;
    }
    Ok(())
}
