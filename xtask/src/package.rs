//! `cargo xtask package`: every published crate is packaged as it would be
//! uploaded, and its own tests run from the packaged sources alone.
//!
//! `cargo package --workspace` builds each crate from its tarball; this also
//! runs the tests, so a test that reads a file outside its crate (a fixture in
//! the repository root) fails here. The tarballs are unpacked into a scratch
//! workspace outside the clone whose `[patch.crates-io]` points every internal
//! crate at its unpacked copy, because none of them is on crates.io yet.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Result, cargo, project_root, run_checked, step, target_dir};

pub(crate) fn run(args: &[String]) -> Result {
    if !args.is_empty() {
        return Err(format!("`package` takes no arguments, got {args:?}"));
    }
    step("cargo package --workspace (each crate built from its tarball)");
    // One target directory for both steps, reused between runs and kept
    // apart from the workspace's own builds.
    let check_target = target_dir().join("package-check");
    forget_earlier_packages(&check_target)?;
    run_checked(
        cargo()
            // The unpublished crates (suites, benchmarks, xtask) are left
            // out: cargo would still resolve their path-only dependencies.
            .args(["package", "--workspace", "--locked"])
            .args([
                "--exclude",
                "conformance",
                "--exclude",
                "bench",
                "--exclude",
                "xtask",
            ])
            .env("CARGO_TARGET_DIR", &check_target),
    )?;

    let packages = check_target.join("package");
    let crates = packaged_crates(&packages)?;
    let scratch = std::env::temp_dir().join("model-runtime-package-check");
    if scratch.exists() {
        fs::remove_dir_all(&scratch).map_err(|e| format!("cleaning {}: {e}", scratch.display()))?;
    }
    fs::create_dir_all(&scratch).map_err(|e| format!("creating {}: {e}", scratch.display()))?;
    let mut members = Vec::new();
    for (name, tarball) in &crates {
        run_checked(
            Command::new("tar")
                .arg("-xzf")
                .arg(tarball)
                .arg("-C")
                .arg(&scratch),
        )?;
        let dir = tarball
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".crate"))
            .ok_or_else(|| format!("unexpected package name {}", tarball.display()))?
            .to_owned();
        members.push((name.clone(), dir));
    }
    fs::write(scratch.join("Cargo.toml"), scratch_manifest(&members))
        .map_err(|e| format!("writing the scratch manifest: {e}"))?;
    fs::copy(
        project_root().join("Cargo.lock"),
        scratch.join("Cargo.lock"),
    )
    .map_err(|e| format!("copying Cargo.lock: {e}"))?;

    step(&format!(
        "the packaged crates' own tests ({})",
        members
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    run_checked(
        cargo()
            .current_dir(&scratch)
            .args(["test", "--workspace"])
            .env("CARGO_TARGET_DIR", &check_target),
    )
}

/// Forgets what an earlier `cargo package --workspace` unpacked and built.
///
/// To build one crate against the tarball of another, cargo lays a local
/// registry over crates.io and unpacks each tarball under
/// `$CARGO_HOME/registry/src/<source>/<name>-<version>`. Cargo treats a
/// registry crate as immutable: it unpacks a name and version once and never
/// rebuilds it, so a later run with changed sources but the same version
/// builds against the old code and fails (or, worse, passes) on code that no
/// longer exists. Removing the unpacked copies and our crates' artifacts in
/// `check_target` makes cargo use the fresh tarballs; the crates.io source
/// and every other crate's artifacts are left alone.
fn forget_earlier_packages(check_target: &Path) -> Result {
    let members = workspace_crates()?;
    let mut clean = cargo();
    clean.arg("clean").env("CARGO_TARGET_DIR", check_target);
    for (name, _) in &members {
        clean.args(["-p", name]);
    }
    run_checked(&mut clean)?;

    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")))
        .ok_or("neither CARGO_HOME nor HOME is set")?;
    let Ok(sources) = fs::read_dir(cargo_home.join("registry").join("src")) else {
        return Ok(()); // nothing was ever unpacked
    };
    for source in sources.flatten() {
        if source
            .file_name()
            .to_string_lossy()
            .starts_with("index.crates.io")
        {
            continue;
        }
        for (name, version) in &members {
            let unpacked = source.path().join(format!("{name}-{version}"));
            if unpacked.is_dir() {
                fs::remove_dir_all(&unpacked)
                    .map_err(|e| format!("removing {}: {e}", unpacked.display()))?;
            }
        }
    }
    Ok(())
}

/// `(name, version)` of every crate under `crates/` in the workspace.
fn workspace_crates() -> Result<Vec<(String, String)>> {
    let manifest = fs::read_to_string(project_root().join("Cargo.toml"))
        .map_err(|e| format!("reading Cargo.toml: {e}"))?;
    let mut crates: Vec<(String, String)> = Vec::new();
    for member in manifest
        .lines()
        .filter_map(|line| line.trim().strip_prefix("\"crates/"))
        .filter_map(|rest| rest.strip_suffix("\","))
    {
        if crates.iter().any(|(name, _)| name == member) {
            continue;
        }
        crates.push((member.to_owned(), crate_version(member)?));
    }
    Ok(crates)
}

/// `(name, path)` of the newest tarball of each crate in `dir`.
fn packaged_crates(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    workspace_crates()?
        .into_iter()
        .map(|(name, version)| {
            let tarball = dir.join(format!("{name}-{version}.crate"));
            if tarball.is_file() {
                Ok((name, tarball))
            } else {
                Err(format!("{} was not packaged", tarball.display()))
            }
        })
        .collect()
}

/// The `version` line of `crates/NAME/Cargo.toml`.
fn crate_version(name: &str) -> Result<String> {
    let path = project_root().join("crates").join(name).join("Cargo.toml");
    let text = fs::read_to_string(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    text.lines()
        .find_map(|line| line.strip_prefix("version = \""))
        .and_then(|rest| rest.strip_suffix('"'))
        .map(str::to_owned)
        .ok_or_else(|| format!("{} has no version of its own", path.display()))
}

fn scratch_manifest(members: &[(String, String)]) -> String {
    let mut text = String::from("[workspace]\nresolver = \"3\"\nmembers = [\n");
    for (_, dir) in members {
        text.push_str(&format!("    \"{dir}\",\n"));
    }
    text.push_str("]\n\n[patch.crates-io]\n");
    for (name, dir) in members {
        text.push_str(&format!("{name} = {{ path = \"{dir}\" }}\n"));
    }
    text
}
