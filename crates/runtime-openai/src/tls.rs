//! TLS for remote servers, with rustls and the `ring` provider (no C build
//! tools beyond a C compiler, no OpenSSL), when the `tls` feature is on.

use runtime_core::{Error, Result};

/// Sets `builder` up with rustls trusting the system's roots and
/// `extra_roots` (PEM). Every client gets it, `http` ones too: with reqwest's
/// provider-less rustls compiled in, a client without a TLS configuration of
/// its own would panic when built.
#[cfg(feature = "tls")]
pub(crate) fn configure(
    builder: reqwest::ClientBuilder,
    base_url: &str,
    extra_roots: &[Vec<u8>],
) -> Result<reqwest::ClientBuilder> {
    use std::sync::Arc;

    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    use rustls_platform_verifier::Verifier;

    let _ = base_url;
    // With reqwest's provider-less rustls compiled in, any other reqwest
    // client in the process needs a process-wide provider: ring, unless the
    // application installed one first.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let invalid = |reason: String| Error::invalid_config("root_certificates", reason);
    let mut roots = Vec::new();
    for pem in extra_roots {
        for cert in CertificateDer::pem_slice_iter(pem) {
            roots.push(cert.map_err(|err| invalid(format!("is not a PEM certificate: {err}")))?);
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Verifier::new_with_extra_roots(roots, provider.clone())
        .map_err(|err| invalid(format!("could not be used: {err}")))?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| invalid(format!("no TLS version: {err}")))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(builder.tls_backend_preconfigured(config))
}

/// Without the `tls` feature, an `https` URL is refused with what to do.
#[cfg(not(feature = "tls"))]
pub(crate) fn configure(
    builder: reqwest::ClientBuilder,
    base_url: &str,
    extra_roots: &[Vec<u8>],
) -> Result<reqwest::ClientBuilder> {
    if base_url.starts_with("https://") || !extra_roots.is_empty() {
        return Err(Error::invalid_config(
            "base_url",
            format!(
                "is {base_url}, which needs TLS: enable runtime-openai's `tls` feature \
                 (runtime-remote does)"
            ),
        ));
    }
    Ok(builder)
}
