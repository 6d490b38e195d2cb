//! `cargo xtask test-backends [BACKEND...]`: unit tests while the engines are
//! provisioned beside them, then each backend's conformance suite against its
//! real engine, and a table.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

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
    ("hardening", &["candle", "llamacpp"]),
    ("attach", &["candle", "llamacpp", "vllm"]),
    ("candle_safetensors", &["candle", "vllm"]),
    ("embeddings", &["candle", "llamacpp", "vllm"]),
];

/// A check's outcome in the table.
#[derive(Clone, PartialEq, Eq, Debug)]
enum Outcome {
    Passed,
    Failed,
    /// Declared by the suite, but no result was reported: it did not run.
    Missing,
    /// Passed by recording that it does not apply to the backend, and why.
    NotApplicable(String),
}

/// One suite's results: every check it declares, in its order.
struct SuiteResult {
    name: String,
    checks: Vec<(String, Outcome)>,
    ok: bool,
    took: Duration,
    /// Seconds per check, where the suite's harness reports them.
    times: Vec<(String, f64)>,
}

pub(crate) fn run(args: &[String]) -> Result {
    let selected = select(args)?;
    // Provisioning (downloads from the registries, llama.cpp's build) runs
    // beside the Rust build and the unit tests: on a fresh machine the two
    // together take little more than the longer of them, and a failing unit
    // test still shows in minutes.
    let provisioning = {
        let selected = selected.clone();
        std::thread::Builder::new()
            .name("provision".into())
            .spawn(move || provision_for(&selected))
            .map_err(|err| format!("could not start provisioning: {err}"))?
    };
    let built = build_and_unit_test();
    if built.is_err() {
        step(
            "the build or a unit test failed; waiting for provisioning to finish, so the cache is whole for the next run",
        );
    }
    // Joined whatever the build did: provisioning is never abandoned halfway.
    let provisioned = provisioning
        .join()
        .map_err(|_| "provisioning panicked".to_owned())?;
    built?;
    let mut env = provisioned?;
    env.push((
        "MODEL_RUNTIME_CLI_BIN".into(),
        crate::target_dir().join("debug/model-runtime").into(),
    ));

    let mut results = Vec::new();
    let mut skipped = Vec::new();
    for backend in &selected {
        step(&format!("conformance suite: {backend}"));
        results.push(run_suite(backend, &env)?);
    }
    for (suite, needs) in EXTRA_SUITES {
        let missing: Vec<&str> = needs
            .iter()
            .copied()
            .filter(|backend| !selected.contains(backend))
            .collect();
        if missing.is_empty() {
            step(&format!("suite {suite}: {}", needs.join(" and ")));
            results.push(run_suite(suite, &env)?);
        } else {
            skipped.push(format!(
                "{suite} (needs {}, not selected)",
                missing.join(", ")
            ));
        }
    }

    print_table(&results);
    if !skipped.is_empty() {
        println!("suites not run: {}", skipped.join("; "));
    }
    let failed: Vec<&str> = results
        .iter()
        .filter(|suite| !suite.ok)
        .map(|suite| suite.name.as_str())
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("conformance failed for: {}", failed.join(", ")))
    }
}

/// The unit tests, then the conformance suite and the `model-runtime` binary
/// the suites run.
fn build_and_unit_test() -> Result {
    step("unit tests (cargo test --workspace --exclude conformance)");
    run_checked(cargo().args(["test", "--workspace", "--exclude", "conformance"]))?;
    run_checked(cargo().args(["test", "-p", "conformance", "--lib"]))?;
    step("building the conformance suite and the model-runtime binary");
    run_checked(cargo().args(["test", "-p", "conformance", "--no-run"]))?;
    run_checked(cargo().args(["build", "-p", "runtime-cli"]))
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
    // The cli suite drives the gateway with OpenAI's and Anthropic's own
    // clients, and serves a base model (Gemma 3 270M) by the completions API;
    // the cross-engine suite holds candle's SentencePiece tokenizer to
    // llama-server's on the same file.
    if ["candle", "llamacpp"].iter().all(|b| backends.contains(b)) {
        env.push((
            "MODEL_RUNTIME_TEST_API_CLIENTS".into(),
            provision::api_clients()?.into(),
        ));
        env.push((
            "MODEL_RUNTIME_TEST_GEMMA_GGUF".into(),
            provision::gemma_model()?.into(),
        ));
    }
    // vLLM first: its environment is mostly downloading, which overlaps
    // best with the CPU-bound work beside it (the Rust build, llama.cpp's).
    let mut order = backends.to_vec();
    order.sort_by_key(|backend| *backend != "vllm");
    for backend in order {
        match backend {
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
    // The cross-engine suite holds fill-in-the-middle to llama-server's own
    // `/infill`, on both engines.
    if ["candle", "llamacpp"].iter().all(|b| backends.contains(b)) {
        env.push((
            "MODEL_RUNTIME_TEST_FIM_GGUF".into(),
            provision::fim_model()?.into(),
        ));
    }
    // The embeddings suite compares all three engines on all-MiniLM-L6-v2,
    // and the cli suite serves its GGUF (which vLLM's Python converts).
    if ["candle", "llamacpp", "vllm"]
        .iter()
        .all(|b| backends.contains(b))
    {
        let model = provision::embedding_model()?;
        env.push(("MODEL_RUNTIME_TEST_EMBEDDING_DIR".into(), model.dir.into()));
        env.push((
            "MODEL_RUNTIME_TEST_EMBEDDING_GGUF".into(),
            model.gguf.into(),
        ));
    }
    Ok(env)
}

fn suite_command(suite: &str) -> std::process::Command {
    let mut command = cargo();
    command.args(["test", "-p", "conformance", "--test", suite, "--"]);
    command
}

/// The checks `suite` declares (`--list`), in its order.
fn declared_checks(suite: &str, env: &[(OsString, OsString)]) -> Result<Vec<String>> {
    let output = suite_command(suite)
        .args(["--list", "--format", "terse"])
        .envs(env.iter().cloned())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("listing the {suite} suite's checks: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "listing the {suite} suite's checks failed ({})",
            output.status
        ));
    }
    let checks: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.strip_suffix(": test"))
        .map(str::to_owned)
        .collect();
    if checks.is_empty() {
        return Err(format!("the {suite} suite declares no checks"));
    }
    Ok(checks)
}

/// Runs one suite, echoing its output and reading each check's result; a
/// declared check that reports nothing is `Missing`, which fails the suite.
fn run_suite(suite: &str, env: &[(OsString, OsString)]) -> Result<SuiteResult> {
    let declared = declared_checks(suite, env)?;
    let started = Instant::now();
    // Checks that do not apply to a backend say so (and why) in this file.
    let not_applicable = crate::target_dir().join(format!("conformance-{suite}.not-applicable"));
    let _ = std::fs::remove_file(&not_applicable);
    // The harness's suites say how long each check took.
    let times = crate::target_dir().join(format!("conformance-{suite}.times"));
    let _ = std::fs::remove_file(&times);
    let mut child = suite_command(suite)
        .arg("--test-threads=1")
        .envs(env.iter().cloned())
        .env("CONFORMANCE_NOT_APPLICABLE", &not_applicable)
        .env("CONFORMANCE_TIMES", &times)
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running the {suite} suite: {e}"))?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut reported = BTreeMap::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.map_err(|e| format!("reading the {suite} suite's output: {e}"))?;
        println!("{line}");
        if let Some((name, outcome)) = parse_result(&line) {
            reported.insert(name.to_owned(), outcome);
        }
    }
    let status = child
        .wait()
        .map_err(|e| format!("waiting for the {suite} suite: {e}"))?;
    let reasons =
        parse_not_applicable(&std::fs::read_to_string(&not_applicable).unwrap_or_default());
    let checks: Vec<(String, Outcome)> = declared
        .into_iter()
        .map(|name| {
            let outcome = match reported.remove(&name) {
                Some(Outcome::Passed) => match reasons.get(&name) {
                    Some(why) => Outcome::NotApplicable(why.clone()),
                    None => Outcome::Passed,
                },
                Some(other) => other,
                None => Outcome::Missing,
            };
            (name, outcome)
        })
        .collect();
    let ok = status.success()
        && checks
            .iter()
            .all(|(_, o)| matches!(o, Outcome::Passed | Outcome::NotApplicable(_)));
    let times = parse_times(&std::fs::read_to_string(&times).unwrap_or_default());
    Ok(SuiteResult {
        name: suite.to_owned(),
        checks,
        ok,
        took: started.elapsed(),
        times,
    })
}

/// `test lifecycle    ... ok` → (`lifecycle`, Passed).
fn parse_result(line: &str) -> Option<(&str, Outcome)> {
    let rest = line.strip_prefix("test ")?;
    let (name, result) = rest.split_once(" ... ")?;
    let outcome = match result.trim() {
        "ok" => Outcome::Passed,
        "FAILED" => Outcome::Failed,
        _ => return None,
    };
    Some((name.trim(), outcome))
}

/// The times file: one `check<TAB>seconds` per line.
fn parse_times(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter_map(|line| {
            let (check, seconds) = line.split_once('\t')?;
            Some((check.to_owned(), seconds.trim().parse().ok()?))
        })
        .collect()
}

/// The not-applicable file: one `check<TAB>reason` per line.
fn parse_not_applicable(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|line| {
            let (check, why) = line.split_once('\t').unwrap_or((line, "no reason given"));
            (!check.is_empty()).then(|| (check.to_owned(), why.to_owned()))
        })
        .collect()
}

/// The conformance suites (one per backend, the same checks) as a
/// backend-by-check table; the other suites one line each; then what is not
/// ok, why n/a, and the slowest checks.
fn print_table(results: &[SuiteResult]) {
    let (backends, others): (Vec<&SuiteResult>, Vec<&SuiteResult>) = results
        .iter()
        .partition(|suite| BACKENDS.contains(&suite.name.as_str()));
    let width = results
        .iter()
        .map(|suite| suite.name.len())
        .max()
        .unwrap_or(7)
        .max(7);
    println!();
    if !backends.is_empty() {
        let mut columns: Vec<&str> = Vec::new();
        for suite in &backends {
            for (name, _) in &suite.checks {
                if !columns.contains(&name.as_str()) {
                    columns.push(name);
                }
            }
        }
        println!("conformance (rows: backends, columns: checks)");
        for (index, column) in columns.iter().enumerate() {
            println!("  {:>2}  {column}", index + 1);
        }
        print!("{:<width$}", "backend");
        for index in 0..columns.len() {
            print!(" {:>4}", index + 1);
        }
        println!("  result");
        for suite in &backends {
            print!("{:<width$}", suite.name);
            for column in &columns {
                let cell = match suite.checks.iter().find(|(name, _)| name == column) {
                    Some((_, outcome)) => cell(outcome),
                    None => "-",
                };
                print!(" {cell:>4}");
            }
            println!("  {}", verdict(suite));
        }
    }
    if !others.is_empty() {
        println!();
        println!("suites across engines");
        for suite in &others {
            let count = |wanted: fn(&Outcome) -> bool| {
                suite.checks.iter().filter(|(_, o)| wanted(o)).count()
            };
            println!(
                "{:<width$}  {:>2} checks: {:>2} ok, {} n/a, {} failed, {} missing  {}",
                suite.name,
                suite.checks.len(),
                count(|o| *o == Outcome::Passed),
                count(|o| matches!(o, Outcome::NotApplicable(_))),
                count(|o| *o == Outcome::Failed),
                count(|o| *o == Outcome::Missing),
                verdict(suite)
            );
        }
    }
    let mut explained = false;
    for suite in results {
        for (name, outcome) in &suite.checks {
            let note = match outcome {
                Outcome::NotApplicable(why) => format!("n/a: {why}"),
                Outcome::Missing => "MISS: declared, but it did not run".to_owned(),
                Outcome::Failed => "FAILED".to_owned(),
                Outcome::Passed => continue,
            };
            if !explained {
                println!();
                explained = true;
            }
            println!("  {}/{name}: {note}", suite.name);
        }
    }
    let mut times: Vec<(String, f64)> = results
        .iter()
        .flat_map(|suite| {
            suite
                .times
                .iter()
                .map(move |(check, seconds)| (format!("{}/{check}", suite.name), *seconds))
        })
        .collect();
    times.sort_by(|a, b| b.1.total_cmp(&a.1));
    if !times.is_empty() {
        println!();
        println!("slowest checks:");
        for (check, seconds) in times.iter().take(8) {
            println!("  {seconds:>6.1} s  {check}");
        }
    }
}

fn cell(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::Passed => "ok",
        Outcome::Failed => "FAIL",
        Outcome::Missing => "MISS",
        Outcome::NotApplicable(_) => "n/a",
    }
}

fn verdict(suite: &SuiteResult) -> String {
    format!(
        "{} ({:.0} s)",
        if suite.ok { "passed" } else { "FAILED" },
        suite.took.as_secs_f64()
    )
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
        // libtest-mimic pads the names into a column.
        assert!(matches!(
            parse_result("test lifecycle    ... ok"),
            Some(("lifecycle", Outcome::Passed))
        ));
        assert!(matches!(
            parse_result("test fault_port_taken ... FAILED"),
            Some(("fault_port_taken", Outcome::Failed))
        ));
        assert!(parse_result("test result: ok. 12 passed").is_none());
        assert!(parse_result("running 12 tests").is_none());
    }

    #[test]
    fn not_applicable_lines_carry_their_reason() {
        let reasons = parse_not_applicable("fault_engine_killed\tin process\nhttp_surface\n");
        assert_eq!(reasons["fault_engine_killed"], "in process");
        assert_eq!(reasons["http_surface"], "no reason given");
    }
}
