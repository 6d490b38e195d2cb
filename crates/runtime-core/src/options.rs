//! Typed backend options and their strict reading from
//! [`RuntimeConfig::extra_config`](crate::RuntimeConfig::extra_config).
//!
//! Each backend declares one options struct ([`BackendOptions`]). Code sets it
//! with [`RuntimeConfig::with_options`](crate::RuntimeConfig::with_options);
//! configuration files put the same keys in `extra_config`. Either way the
//! backend reads it back with
//! [`RuntimeConfig::options`](crate::RuntimeConfig::options), which refuses an
//! unknown key (naming the known ones and the closest) and a value of the wrong
//! type (naming the key) before anything is started.

use std::collections::BTreeMap;
use std::fmt::Debug;

use serde::de::{self, Deserialize, DeserializeOwned, Deserializer, Visitor};
use serde::{Serialize, forward_to_deserialize_any};
use serde_json::{Map, Value};

use crate::{Error, Result};

/// The options of one backend, as a struct with named fields.
///
/// Implementors derive `Serialize` and `Deserialize` with
/// `#[serde(default)]` (every key may be left out) and skip unset fields when
/// serializing, so that [`RuntimeConfig::with_options`](crate::RuntimeConfig::with_options)
/// only writes what was set. Their field names are the keys accepted in
/// `extra_config`.
pub trait BackendOptions: Serialize + DeserializeOwned + Default + Debug + Clone {
    /// The backend's name in error messages (`vLLM`).
    const BACKEND: &'static str;

    /// Checks the options together (ranges, combinations), after each key was
    /// read. The default accepts anything that parsed.
    fn validate(&self) -> Result<()> {
        Ok(())
    }
}

/// The keys `O` accepts: its field names, as serde sees them.
pub fn option_keys<O: BackendOptions>() -> &'static [&'static str] {
    field_names::<O>()
}

/// Reads `O` from `extra`: unknown keys and values of the wrong type are
/// [`Error::InvalidConfig`] naming the key.
pub(crate) fn parse<O: BackendOptions>(extra: &BTreeMap<String, Value>) -> Result<O> {
    let known = option_keys::<O>();
    for (key, value) in extra {
        if !known.contains(&key.as_str()) {
            return Err(unknown_key(O::BACKEND, key, known));
        }
        // One key at a time, so a type error names its key.
        let single = Map::from_iter([(key.clone(), value.clone())]);
        if let Err(err) = O::deserialize(Value::Object(single)) {
            return Err(Error::invalid_config(
                format!("extra_config.{key}"),
                format!(
                    "is {value}, which is not a valid {} option: {err}",
                    O::BACKEND
                ),
            ));
        }
    }
    let all: Map<String, Value> = extra.clone().into_iter().collect();
    let options = O::deserialize(Value::Object(all))
        .map_err(|err| Error::invalid_config("extra_config", format!("is not valid: {err}")))?;
    options.validate()?;
    Ok(options)
}

/// `options` as `extra_config` entries (unset fields are left out).
pub(crate) fn to_entries<O: BackendOptions>(options: &O) -> BTreeMap<String, Value> {
    match serde_json::to_value(options) {
        Ok(Value::Object(map)) => map.into_iter().filter(|(_, v)| !v.is_null()).collect(),
        // A struct with named fields serializes to an object; anything else is
        // a bug in the options type, caught by its own tests.
        _ => BTreeMap::new(),
    }
}

fn unknown_key(backend: &str, key: &str, known: &[&str]) -> Error {
    let suggestion = closest(key, known)
        .map(|near| format!("did you mean `{near}`? "))
        .unwrap_or_default();
    let known = if known.is_empty() {
        "it takes none".to_owned()
    } else {
        format!(
            "known keys: {}",
            known
                .iter()
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    Error::invalid_config(
        format!("extra_config.{key}"),
        format!("is not a {backend} option; {suggestion}({known})"),
    )
}

/// The known key nearest to `key` by edit distance, if it is near enough to be
/// a typo (at most a third of its length, and at least 2, edits away).
pub(crate) fn closest<'a>(key: &str, known: &[&'a str]) -> Option<&'a str> {
    let limit = (key.chars().count() / 3).max(2);
    known
        .iter()
        .map(|candidate| (edit_distance(key, candidate), *candidate))
        .filter(|(distance, _)| *distance <= limit)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate)
}

/// Levenshtein distance over characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        previous = current;
    }
    previous[b.len()]
}

/// The field names a derived `Deserialize` asks for, captured by a
/// deserializer that records them and then refuses to go on.
fn field_names<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(FieldCapture(&mut fields));
    fields
}

struct FieldCapture<'a>(&'a mut &'static [&'static str]);

impl<'de> Deserializer<'de> for FieldCapture<'_> {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("only structs have field names"))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        *self.0 = fields;
        Err(de::Error::custom("field names captured"))
    }

    forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map enum identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Clone, Default, Serialize, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Demo {
        #[serde(skip_serializing_if = "Option::is_none")]
        tensor_parallel_size: Option<u32>,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        enforce_eager: bool,
    }

    impl BackendOptions for Demo {
        const BACKEND: &'static str = "demo";
    }

    fn extra(json: serde_json::Value) -> BTreeMap<String, Value> {
        json.as_object().unwrap().clone().into_iter().collect()
    }

    #[test]
    fn the_keys_are_the_field_names() {
        assert_eq!(
            option_keys::<Demo>(),
            ["tensor_parallel_size", "enforce_eager"]
        );
    }

    #[test]
    fn a_typo_names_the_key_the_closest_known_one_and_all_of_them() {
        let err = parse::<Demo>(&extra(serde_json::json!({"tensor_paralel_size": 2}))).unwrap_err();
        let Error::InvalidConfig { field, reason } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(field, "extra_config.tensor_paralel_size");
        assert!(
            reason.contains("did you mean `tensor_parallel_size`?"),
            "{reason}"
        );
        assert!(reason.contains("`enforce_eager`"), "{reason}");
    }

    #[test]
    fn a_value_of_the_wrong_type_names_its_key() {
        let err = parse::<Demo>(&extra(
            serde_json::json!({"enforce_eager": 1, "tensor_parallel_size": 2}),
        ))
        .unwrap_err();
        assert!(
            matches!(&err, Error::InvalidConfig { field, .. } if field == "extra_config.enforce_eager"),
            "{err:?}"
        );
    }

    #[test]
    fn set_options_round_trip_and_unset_ones_are_left_out() {
        let options = Demo {
            tensor_parallel_size: Some(2),
            enforce_eager: false,
        };
        let entries = to_entries(&options);
        assert_eq!(entries.len(), 1);
        let back: Demo = parse(&entries).unwrap();
        assert_eq!(back.tensor_parallel_size, Some(2));
    }

    #[test]
    fn only_near_keys_are_suggested() {
        let known = ["queue", "requantize"];
        assert_eq!(closest("requantise", &known), Some("requantize"));
        assert_eq!(closest("qeue", &known), Some("queue"));
        assert_eq!(closest("tensor_parallel_size", &known), None);
    }
}
