//! Finding engine binaries and free ports.

use std::net::TcpListener;
use std::path::{Path, PathBuf};

use runtime_core::{Error, Result};

/// Where to look for an engine binary, in order.
#[derive(Debug, Clone)]
pub struct BinarySearch<'a> {
    /// The binary's name, looked up on `PATH` last.
    pub name: &'a str,
    /// Other names it goes by, looked up on `PATH` after `name`
    /// (llama.cpp's `rpc-server` is also shipped as `ggml-rpc-server`).
    pub also: &'a [&'a str],
    /// An explicitly configured path ([`RuntimeConfig::runtime_binary`](runtime_core::RuntimeConfig::runtime_binary)).
    pub explicit: Option<&'a Path>,
    /// The environment variable that may hold the path (`LLAMA_SERVER_BIN`).
    pub env_var: &'a str,
    /// How to install the binary, for the not-found error.
    pub install_hint: &'a str,
}

impl BinarySearch<'_> {
    /// The explicit path, then the environment variable, then `PATH`.
    ///
    /// An explicit path or variable that points nowhere is an error naming it,
    /// not a silent fall-through to `PATH`.
    pub fn find(&self) -> Result<PathBuf> {
        if let Some(path) = self.explicit {
            return self.existing(path, "the configured runtime_binary");
        }
        if let Some(value) = std::env::var_os(self.env_var).filter(|v| !v.is_empty()) {
            let from_env = format!("${}", self.env_var);
            return self.existing(Path::new(&value), &from_env);
        }
        std::iter::once(self.name)
            .chain(self.also.iter().copied())
            .find_map(|name| which::which(name).ok())
            .ok_or_else(|| Error::BinaryNotFound {
                binary: self.name.to_owned(),
                hint: format!(
                    "not on PATH and ${} is not set; {}",
                    self.env_var, self.install_hint
                ),
            })
    }

    fn existing(&self, path: &Path, origin: &str) -> Result<PathBuf> {
        if path.is_file() {
            Ok(path.to_owned())
        } else {
            Err(Error::BinaryNotFound {
                binary: self.name.to_owned(),
                hint: format!(
                    "{origin} points to {}, which is not a file; {}",
                    path.display(),
                    self.install_hint
                ),
            })
        }
    }
}

/// A port on `host` that nothing listens on right now.
///
/// Another process may take it before the engine binds it; server backends
/// retry with a fresh port when the engine reports the address in use.
pub fn free_port(host: &str) -> Result<u16> {
    free_port_at(host, 0)
}

/// Checks that `port` on `host` is free now, so a start on it is worth
/// trying: [`Error::port_in_use`] when another process listens on it. (It
/// may still be taken before the engine binds it; the engine then fails to
/// bind, and readiness never takes another process's socket for its own.)
pub fn ensure_port_free(host: &str, port: u16) -> Result<()> {
    free_port_at(host, port).map(drop)
}

fn free_port_at(host: &str, port: u16) -> Result<u16> {
    let listener = TcpListener::bind((host, port)).map_err(|err| match err.kind() {
        std::io::ErrorKind::AddrInUse if port != 0 => Error::port_in_use(host, port),
        _ => Error::io(format!("error binding {host}:{port}"), err),
    })?;
    let port = listener
        .local_addr()
        .map_err(|err| Error::io("error reading the bound port", err))?
        .port();
    Ok(port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_another_process_listens_on_is_refused_by_name() {
        let taken = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let port = taken.local_addr().unwrap().port();
        match ensure_port_free("127.0.0.1", port) {
            Err(Error::InvalidConfig { field, reason }) => {
                assert_eq!(field, "port");
                assert!(reason.contains(&port.to_string()), "{reason}");
            }
            other => panic!("a taken port is InvalidConfig naming it, got {other:?}"),
        }
        drop(taken);
        ensure_port_free("127.0.0.1", port).expect("free once released");
    }

    #[test]
    fn an_explicit_path_that_does_not_exist_is_named_in_the_error() {
        let search = BinarySearch {
            name: "llama-server",
            also: &[],
            explicit: Some(Path::new("/nonexistent/llama-server")),
            env_var: "RUNTIME_PROCESS_TEST_UNSET",
            install_hint: "run `cargo xtask provision llamacpp`",
        };
        let err = search.find().unwrap_err().to_string();
        assert!(err.contains("/nonexistent/llama-server"), "{err}");
        assert!(err.contains("cargo xtask provision llamacpp"), "{err}");
    }

    #[test]
    fn a_binary_on_path_is_found_by_any_of_its_names() {
        let search = BinarySearch {
            name: "no-such-engine-binary",
            also: &["sh"],
            explicit: None,
            env_var: "RUNTIME_PROCESS_TEST_UNSET",
            install_hint: "",
        };
        assert!(search.find().unwrap().ends_with("sh"));
    }

    #[test]
    fn a_missing_binary_names_the_variable_to_set() {
        let search = BinarySearch {
            name: "no-such-engine-binary",
            also: &[],
            explicit: None,
            env_var: "NO_SUCH_ENGINE_BIN",
            install_hint: "install it",
        };
        let err = search.find().unwrap_err().to_string();
        assert!(err.contains("$NO_SUCH_ENGINE_BIN"), "{err}");
    }

    #[test]
    fn free_ports_are_bindable() {
        let port = free_port("127.0.0.1").unwrap();
        TcpListener::bind(("127.0.0.1", port)).unwrap();
    }
}
