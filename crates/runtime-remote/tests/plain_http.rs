//! A key is a secret: it never goes over plain HTTP to another host, where
//! anyone on the path reads it (the heartbeat would repeat it every few
//! seconds).

use std::time::Duration;

use runtime_core::{Error, ModelRuntime, RuntimeConfig};
use runtime_remote::{RemoteOptions, RemoteRuntime};

/// An address of this machine that is not loopback: what another host is
/// to the rule, and a listener there sees whether anything was sent.
fn outside_address() -> std::net::IpAddr {
    let probe = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    probe
        .connect("192.0.2.1:9")
        .expect("a route off this machine");
    let ip = probe.local_addr().unwrap().ip();
    assert!(!ip.is_loopback());
    ip
}

#[tokio::test]
async fn a_key_is_never_sent_over_plain_http_to_another_host() {
    let ip = outside_address();
    let listener = std::net::TcpListener::bind((ip, 0)).unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();

    let mut runtime = RemoteRuntime::new();
    let config = RuntimeConfig::new(format!("http://{ip}:{port}")).with_api_key("a-secret-key");
    let err = runtime.initialize(config).await.unwrap_err();
    match &err {
        Error::InvalidConfig { field, reason } => {
            assert_eq!(field, "api_key");
            assert!(reason.contains("https"), "says what to do: {reason}");
        }
        other => panic!("refused before connecting, got {other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        listener.accept().is_err(),
        "nothing connected to the server, let alone sent it the key"
    );

    // Explicitly allowed (a private network the operator trusts), it goes.
    let allowed = RuntimeConfig::new(format!("http://{ip}:{port}"))
        .with_api_key("a-secret-key")
        .with_options(&RemoteOptions::new().with_allow_plain_http_key(true));
    let mut runtime = RemoteRuntime::new();
    let attempt = tokio::spawn(async move { runtime.initialize(allowed).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        listener.accept().is_ok(),
        "with the option set, it connects"
    );
    attempt.abort();
}

#[tokio::test]
async fn a_key_over_plain_http_to_loopback_is_fine() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut runtime = RemoteRuntime::new();
    let config = RuntimeConfig::new(format!("http://127.0.0.1:{port}")).with_api_key("k");
    let attempt = tokio::spawn(async move { runtime.initialize(config).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        listener.accept().is_ok(),
        "loopback never leaves the machine"
    );
    attempt.abort();
}
