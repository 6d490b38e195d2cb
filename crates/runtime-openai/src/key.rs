//! Per-instance API keys.

use runtime_core::{ApiKey, Error, Result};

/// 128 random bits from the operating system, hex-encoded: the key a runtime
/// requires when the configuration names none, so other local users cannot use
/// its engine.
pub fn random_api_key() -> Result<ApiKey> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|err| {
        Error::io(
            "error generating an API key",
            std::io::Error::other(err.to_string()),
        )
    })?;
    Ok(ApiKey::new(
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_keys_are_random_hex_of_128_bits() {
        let a = random_api_key().unwrap();
        let b = random_api_key().unwrap();
        assert_eq!(a.expose().len(), 32);
        assert!(a.expose().chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
