//! The real engine responses in `tests/captures/`, for the tests of this crate.
// Each test binary includes this module and uses part of it.
#![allow(dead_code)]

use std::path::PathBuf;

pub(crate) fn capture_path(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/captures")
        .join(relative)
}

pub(crate) fn capture(relative: &str) -> String {
    let path = capture_path(relative);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|err| panic!("capture {} is readable: {err}", path.display()))
}

/// The JSON payloads of an SSE capture's `data:` lines, `[DONE]` excluded.
pub(crate) fn sse_payloads(relative: &str) -> Vec<String> {
    capture(relative)
        .lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .filter(|data| *data != "[DONE]")
        .map(str::to_owned)
        .collect()
}
