//! Durations as people write them in configuration: `"500ms"`, `"30s"`,
//! `"5m"`, `"1h"`. One spelling everywhere a file or an option holds a
//! duration; code uses [`Duration`].
//!
//! ```
//! use std::time::Duration;
//! use runtime_core::duration;
//!
//! assert_eq!(duration::parse("1.5s").unwrap(), Duration::from_millis(1500));
//! assert_eq!(duration::parse("10m").unwrap(), Duration::from_secs(600));
//! assert_eq!(duration::format(Duration::from_secs(90)), "90s");
//! assert!(duration::parse("30").is_err()); // a unit is required
//! ```
//!
//! With serde, `#[serde(with = "runtime_core::duration::serde")]` on a
//! `Duration` field, or `duration::serde::optional` on an `Option<Duration>`.

use std::time::Duration;

/// The longest duration accepted: a year. Longer ones are mistakes, and a
/// bound keeps arithmetic on durations from overflowing (`Instant + d`).
pub const MAX: Duration = Duration::from_secs(365 * 24 * 3600);

/// Parses `"500ms"`, `"30s"`, `"1.5s"`, `"5m"`, `"1h"` or `"2d"`. A unit is
/// required; the value must be finite, not negative, and at most [`MAX`].
pub fn parse(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like \"30s\" or \"5m\""))?;
    let scale = match unit.trim() {
        "ms" => 1e-3,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86400.0,
        "" => {
            return Err(format!(
                "{text:?} has no unit; write it like \"{text}s\" (units: ms, s, m, h, d)"
            ));
        }
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?}; use ms, s, m, h or d"
            ));
        }
    };
    let seconds = number * scale;
    if !(0.0..=MAX.as_secs_f64()).contains(&seconds) {
        return Err(format!("{text:?} is longer than a year"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// The shortest exact spelling of `duration` that [`parse`] reads back:
/// `"90s"`, `"10m"`, `"250ms"`, `"1.5s"`.
pub fn format(duration: Duration) -> String {
    let millis = duration.as_millis();
    if !duration.subsec_nanos().is_multiple_of(1_000_000) {
        return format!("{}s", duration.as_secs_f64());
    }
    if !millis.is_multiple_of(1000) {
        return format!("{millis}ms");
    }
    let seconds = duration.as_secs();
    match seconds {
        0 => "0s".to_owned(),
        s if s.is_multiple_of(3600) => format!("{}h", s / 3600),
        s if s.is_multiple_of(60) && s >= 600 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// serde support: durations as [`parse`] strings.
pub mod serde {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Serializes as [`format`](super::format) writes it.
    pub fn serialize<S: Serializer>(value: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format(*value))
    }

    /// Deserializes what [`parse`](super::parse) reads.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d).map_err(|_| {
            serde::de::Error::custom(
                "expected a duration with a unit, like \"30s\", \"500ms\" or \"5m\"",
            )
        })?;
        super::parse(&text).map_err(serde::de::Error::custom)
    }

    /// The same for `Option<Duration>` (`null` or absent: `None`).
    pub mod optional {
        use std::time::Duration;

        use serde::{Deserialize, Deserializer, Serializer};

        /// Serializes `Some` as [`format`](crate::duration::format) writes it.
        pub fn serialize<S: Serializer>(value: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
            match value {
                Some(duration) => s.serialize_str(&crate::duration::format(*duration)),
                None => s.serialize_none(),
            }
        }

        /// Deserializes `null` as `None`, a duration string as `Some`.
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            #[derive(Deserialize)]
            struct Wrapped(#[serde(with = "super")] Duration);
            Ok(Option::<Wrapped>::deserialize(d)?.map(|Wrapped(duration)| duration))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_unit_parses_and_a_bare_number_is_refused() {
        assert_eq!(parse("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse(" 2h ").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse("1d").unwrap(), Duration::from_secs(86400));
        assert!(parse("30").unwrap_err().contains("no unit"));
        assert!(parse("5 parsecs").unwrap_err().contains("unknown unit"));
        assert!(parse("-1s").is_err());
    }

    #[test]
    fn huge_values_are_refused_rather_than_overflowing_later() {
        // The probe's `queue_timeout = 1e19`, as seconds, and in exponent form.
        let err = parse("10000000000000000000s").unwrap_err();
        assert!(err.contains("longer than a year"), "{err}");
        assert!(parse("1e19s").is_err());
        assert!(parse("400d").unwrap_err().contains("longer than a year"));
        assert!(parse("365d").is_ok());
    }

    #[test]
    fn formatting_reads_back_exactly() {
        for duration in [
            Duration::ZERO,
            Duration::from_millis(250),
            Duration::from_millis(1500),
            Duration::from_secs(90),
            Duration::from_secs(600),
            Duration::from_secs(7200),
            Duration::from_micros(1500),
        ] {
            assert_eq!(parse(&format(duration)).unwrap(), duration, "{duration:?}");
        }
        assert_eq!(format(Duration::from_secs(600)), "10m");
        assert_eq!(format(Duration::from_secs(3600)), "1h");
    }
}
