//! `cargo xtask bench [BACKEND...]`: the benchmarks, built with optimisations,
//! against the provisioned engines.

use crate::{Result, cargo, run_checked, test_backends};

pub(crate) fn run(args: &[String]) -> Result {
    let backends = test_backends::select(args)?;
    let env = test_backends::provision_for(&backends)?;
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
