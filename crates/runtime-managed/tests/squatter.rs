//! A process that takes the engine's port while the engine starts, and
//! answers every request with 200, is not taken for the engine: readiness
//! requires the engine's own process group to hold the listening socket.
#![cfg(target_os = "linux")]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use runtime_core::{BackendOptions, Error, ModelFormat, ModelRuntime, Result, RuntimeConfig};
use runtime_managed::{LaunchSpec, ManagedServer, ServerEngine};
use runtime_process::ServerCommand;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
struct NoOptions {}

impl BackendOptions for NoOptions {
    const BACKEND: &'static str = "squatted";
}

/// An "engine" that never binds its port (`sleep`), while a squatter, bound
/// the moment the port is chosen, answers everything on it with 200.
#[derive(Default)]
struct Squatted {
    requests: Arc<Mutex<Vec<String>>>,
}

#[async_trait]
impl ServerEngine for Squatted {
    type Options = NoOptions;

    fn engine_name(&self) -> &'static str {
        "squatted"
    }

    fn runtime_name(&self) -> &'static str {
        "squatted"
    }

    fn supported_format(&self) -> ModelFormat {
        ModelFormat::Gguf
    }

    fn supports_gpu(&self) -> bool {
        false
    }

    fn validate(&self, _config: &RuntimeConfig, _options: &NoOptions) -> Result<()> {
        Ok(())
    }

    fn find_binary(&self, _config: &RuntimeConfig) -> Result<PathBuf> {
        Ok(PathBuf::from("/bin/sleep"))
    }

    async fn binary_version(
        &self,
        _binary: &Path,
        _config: &RuntimeConfig,
    ) -> Result<Option<String>> {
        Ok(Some("0".to_owned()))
    }

    fn command(&self, launch: &LaunchSpec<'_, NoOptions>) -> Result<ServerCommand> {
        let squatter = std::net::TcpListener::bind(("127.0.0.1", launch.port))
            .expect("the squatter takes the engine's port");
        let requests = self.requests.clone();
        std::thread::spawn(move || {
            for socket in squatter.incoming() {
                let Ok(mut socket) = socket else { return };
                let mut buffer = [0u8; 8192];
                let read = socket.read(&mut buffer).unwrap_or(0);
                requests
                    .lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buffer[..read]).into_owned());
                let _ = socket
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\n{\"status\":\"ok\"}");
            }
        });
        let mut command = ServerCommand::new("squatted", "/bin/sleep");
        command.arg("30");
        Ok(command)
    }

    fn default_startup_timeout(&self) -> Duration {
        Duration::from_secs(2)
    }

    fn port_conflict(&self, _log_tail: &[String]) -> bool {
        false
    }
}

#[tokio::test]
async fn a_squatter_on_the_engines_port_is_not_taken_for_the_engine() {
    let model = tempfile::Builder::new().suffix(".gguf").tempfile().unwrap();
    std::fs::write(
        model.path(),
        b"GGUF\x03\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0",
    )
    .unwrap();
    let engine = Squatted::default();
    let requests = engine.requests.clone();
    let mut runtime = ManagedServer::with_engine(engine);
    let key = "the-squatter-must-never-see-this";
    let config = RuntimeConfig::new(model.path()).with_api_key(key);
    let err = runtime.initialize(config).await.unwrap_err();
    assert!(
        matches!(err, Error::StartupTimeout { .. }),
        "not ready: the socket is not the engine's, got {err:?}"
    );
    assert!(!runtime.is_ready().await);
    let seen = requests.lock().unwrap().clone();
    assert!(
        seen.iter().all(|request| !request.contains(key)),
        "the squatter saw the key: {seen:?}"
    );
}
