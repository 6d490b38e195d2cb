//! Shared access to the captured engine responses in the repository's `fixtures/`.
// Each test binary includes this module and uses part of it.
#![allow(dead_code)]

use std::path::PathBuf;

pub(crate) fn fixture_path(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(relative)
}

pub(crate) fn fixture(relative: &str) -> String {
    let path = fixture_path(relative);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|err| panic!("fixture {} is readable: {err}", path.display()))
}

/// The JSON payloads of an SSE capture's `data:` lines, `[DONE]` excluded.
pub(crate) fn sse_payloads(relative: &str) -> Vec<String> {
    fixture(relative)
        .lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .filter(|data| *data != "[DONE]")
        .map(str::to_owned)
        .collect()
}
