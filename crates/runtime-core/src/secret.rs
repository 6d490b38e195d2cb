//! [`ApiKey`]: a bearer token that never shows in logs or `Debug` output.

use std::fmt;

use serde::{Deserialize, Serialize};

/// An API key. `Debug` and `Display` print `<redacted>`; the key itself is
/// only reachable through [`ApiKey::expose`], so it cannot end up in a log
/// line, an error message or a panic by accident.
///
/// ```
/// use runtime_core::ApiKey;
/// let key = ApiKey::new("s3cret");
/// assert_eq!(format!("{key:?}"), "ApiKey(<redacted>)");
/// assert_eq!(key.expose(), "s3cret");
/// ```
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ApiKey(String);

impl ApiKey {
    /// Wraps a key.
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }

    /// The key itself, to send or compare.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `given` is this key, compared in constant time: how long it
    /// takes does not tell how much of a guess was right.
    ///
    /// ```
    /// use runtime_core::ApiKey;
    /// let key = ApiKey::new("s3cret");
    /// assert!(key.matches("s3cret"));
    /// assert!(!key.matches("s3creT") && !key.matches("s3cret!"));
    /// ```
    pub fn matches(&self, given: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), given.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }

    /// Whether `given` is one of `keys`. Every key is compared, so timing
    /// does not tell which one matched either.
    pub fn any_matches(keys: &[ApiKey], given: &str) -> bool {
        keys.iter()
            .fold(false, |found, key| found | key.matches(given))
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

impl fmt::Display for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl From<String> for ApiKey {
    fn from(key: String) -> Self {
        Self(key)
    }
}

impl From<&str> for ApiKey {
    fn from(key: &str) -> Self {
        Self(key.to_owned())
    }
}
