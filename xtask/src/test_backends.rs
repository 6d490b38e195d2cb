//! `cargo xtask test-backends`: unit tests, then each backend's conformance suite.

use crate::{Result, cargo, run_checked};

pub(crate) fn run(args: &[String]) -> Result {
    if let Some(arg) = args.first() {
        return Err(format!("test-backends takes no arguments yet, got `{arg}`"));
    }
    eprintln!("==> unit tests (cargo test --workspace)");
    run_checked(cargo().args(["test", "--workspace"]))
}
