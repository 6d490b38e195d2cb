//! Starts one backend's runtime, prints `READY <base_url> <engine pid>` (0
//! for an in-process engine), and waits to be killed.
//!
//! The `fault_owner_killed` check SIGKILLs this process and proves the engine
//! dies with it.
#![allow(clippy::print_stdout)]

use std::io::Write;

#[tokio::main]
async fn main() {
    let name = std::env::args()
        .nth(1)
        .expect("usage: hold-runtime <backend>");
    let backend =
        conformance::backends::by_name(&name).unwrap_or_else(|| panic!("unknown backend {name:?}"));
    let runtime = conformance::checks::start(&backend).await;
    println!(
        "READY {} {}",
        runtime.base_url(),
        runtime.engine_pid().unwrap_or(0)
    );
    std::io::stdout().flush().expect("stdout is open");
    std::future::pending::<()>().await;
}
