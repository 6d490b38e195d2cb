//! `cargo xtask test-backends [BACKEND...]`: provision, unit tests, then each
//! backend's conformance suite against its real engine, and a table.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::process::Stdio;

use crate::{Result, cargo, provision, run_checked, step};

/// Every backend with a conformance suite, in table order.
pub(crate) const BACKENDS: &[&str] = &["llamacpp", "candle", "vllm"];

/// Suites that compare two engines, run when both are selected.
/// `cli` runs the built `model-runtime` binary and hot swaps between
/// candle and llama.cpp; `candle_safetensors` checks candle's Hugging Face
/// loader against vLLM on the same directory.
const EXTRA_SUITES: &[(&str, &[&str])] = &[
    ("rpc", &["llamacpp"]),
    ("vllm_parallel", &["vllm"]),
    ("candle_native", &["candle"]),
    ("cross_engine", &["candle", "llamacpp"]),
    ("cli", &["candle", "llamacpp"]),
    ("gateway", &["candle", "llamacpp"]),
    ("attach", &["candle", "llamacpp", "vllm"]),
    ("candle_safetensors", &["candle", "vllm"]),
];

/// A check's outcome in the table.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Passed,
    Failed,
    /// Passed by recording that it does not apply to the backend.
    NotApplicable,
}

pub(crate) fn run(args: &[String]) -> Result {
    let selected = select(args)?;
    let env = provision_for(&selected)?;

    step("unit tests (cargo test --workspace --exclude conformance)");
    run_checked(cargo().args(["test", "--workspace", "--exclude", "conformance"]))?;
    run_checked(cargo().args(["test", "-p", "conformance", "--lib"]))?;

    step("building the conformance suite and the model-runtime binary");
    run_checked(cargo().args(["test", "-p", "conformance", "--no-run"]))?;
    run_checked(cargo().args(["build", "-p", "runtime-cli"]))?;
    let mut env = env;
    env.push((
        "MODEL_RUNTIME_CLI_BIN".into(),
        crate::target_dir().join("debug/model-runtime").into(),
    ));

    let mut results: Vec<(&str, BTreeMap<String, Outcome>, bool)> = Vec::new();
    for backend in &selected {
        step(&format!("conformance suite: {backend}"));
        let (checks, ok) = run_suite(backend, &env)?;
        results.push((backend, checks, ok));
    }
    for (suite, needs) in EXTRA_SUITES {
        if needs.iter().all(|backend| selected.contains(backend)) {
            step(&format!("suite {suite}: {}", needs.join(" and ")));
            let (checks, ok) = run_suite(suite, &env)?;
            results.push((suite, checks, ok));
        }
    }

    print_table(&results);
    let failed: Vec<&str> = results
        .iter()
        .filter(|(_, _, ok)| !ok)
        .map(|(backend, _, _)| *backend)
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("conformance failed for: {}", failed.join(", ")))
    }
}

pub(crate) fn select(args: &[String]) -> Result<Vec<&'static str>> {
    if args.is_empty() {
        return Ok(BACKENDS.to_vec());
    }
    args.iter()
        .map(|arg| {
            BACKENDS
                .iter()
                .find(|b| **b == arg.as_str())
                .copied()
                .ok_or_else(|| format!("unknown backend `{arg}`; known: {}", BACKENDS.join(", ")))
        })
        .collect()
}

/// Provisions what the selected backends need; returns the suite's environment.
pub(crate) fn provision_for(backends: &[&str]) -> Result<Vec<(OsString, OsString)>> {
    let mut env = vec![(
        "MODEL_RUNTIME_TEST_GGUF".into(),
        provision::demo_model()?.into(),
    )];
    for backend in backends {
        match *backend {
            "llamacpp" => {
                let llama = provision::llama_cpp()?;
                env.push(("LLAMA_SERVER_BIN".into(), llama.server.into()));
                env.push(("LLAMA_RPC_SERVER_BIN".into(), llama.rpc_server.into()));
            }
            // In process: the model is all it needs.
            "candle" => {}
            "vllm" => {
                let vllm = provision::vllm()?;
                env.push(("VLLM_PYTHON".into(), vllm.python.into()));
                env.push(("MODEL_RUNTIME_TEST_HF_MODEL".into(), vllm.model.into()));
            }
            other => return Err(format!("no provisioning known for `{other}`")),
        }
    }
    Ok(env)
}

/// Runs one backend's suite, echoing its output and reading each check's result.
fn run_suite(
    backend: &str,
    env: &[(OsString, OsString)],
) -> Result<(BTreeMap<String, Outcome>, bool)> {
    // Checks that do not apply to a backend say so in this file.
    let not_applicable = crate::target_dir().join(format!("conformance-{backend}.not-applicable"));
    let _ = std::fs::remove_file(&not_applicable);
    let mut child = cargo()
        .args([
            "test",
            "-p",
            "conformance",
            "--test",
            backend,
            "--",
            "--test-threads=1",
        ])
        .envs(env.iter().cloned())
        .env("CONFORMANCE_NOT_APPLICABLE", &not_applicable)
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running the {backend} suite: {e}"))?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut checks = BTreeMap::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.map_err(|e| format!("reading the {backend} suite's output: {e}"))?;
        println!("{line}");
        if let Some((name, outcome)) = parse_result(&line) {
            checks.insert(name.to_owned(), outcome);
        }
    }
    let status = child
        .wait()
        .map_err(|e| format!("waiting for the {backend} suite: {e}"))?;
    for check in std::fs::read_to_string(&not_applicable)
        .unwrap_or_default()
        .lines()
    {
        if let Some(outcome @ Outcome::Passed) = checks.get_mut(check) {
            *outcome = Outcome::NotApplicable;
        }
    }
    let ok =
        status.success() && !checks.is_empty() && checks.values().all(|o| *o != Outcome::Failed);
    Ok((checks, ok))
}

/// `test lifecycle ... ok` → (`lifecycle`, Passed).
fn parse_result(line: &str) -> Option<(&str, Outcome)> {
    let rest = line.strip_prefix("test ")?;
    let (name, result) = rest.split_once(" ... ")?;
    let outcome = match result.trim() {
        "ok" => Outcome::Passed,
        "FAILED" => Outcome::Failed,
        _ => return None,
    };
    Some((name, outcome))
}

fn print_table(results: &[(&str, BTreeMap<String, Outcome>, bool)]) {
    let mut columns: Vec<&str> = Vec::new();
    for (_, checks, _) in results {
        for name in checks.keys() {
            if !columns.contains(&name.as_str()) {
                columns.push(name);
            }
        }
    }
    let width = results
        .iter()
        .map(|(b, _, _)| b.len())
        .max()
        .unwrap_or(7)
        .max(7);
    println!();
    println!("conformance (rows: backends, columns: check groups)");
    for (index, column) in columns.iter().enumerate() {
        println!("  {:>2}  {column}", index + 1);
    }
    print!("{:<width$}", "backend");
    for index in 0..columns.len() {
        print!(" {:>4}", index + 1);
    }
    println!("  result");
    for (backend, checks, ok) in results {
        print!("{backend:<width$}");
        for column in &columns {
            let cell = match checks.get(*column) {
                Some(Outcome::Passed) => "ok",
                Some(Outcome::Failed) => "FAIL",
                Some(Outcome::NotApplicable) => "n/a",
                None => "-",
            };
            print!(" {cell:>4}");
        }
        println!("  {}", if *ok { "passed" } else { "FAILED" });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libtest_result_lines_are_parsed() {
        assert!(matches!(
            parse_result("test lifecycle ... ok"),
            Some(("lifecycle", Outcome::Passed))
        ));
        assert!(matches!(
            parse_result("test fault_port_taken ... FAILED"),
            Some(("fault_port_taken", Outcome::Failed))
        ));
        assert!(parse_result("test result: ok. 12 passed").is_none());
        assert!(parse_result("running 12 tests").is_none());
    }
}
