//! JSON Schemas: which keywords an engine's constrained decoding enforces
//! ([`Enforcer`], [`check_enforceable`]), and validation of what it produced
//! ([`Validator`]).
//!
//! An engine that silently ignores a keyword produces answers that may
//! break it; validation would then fail the request after the fact. Refusing
//! the keyword up front, by name and place, tells the caller before any
//! tokens are spent.

use serde_json::{Map, Value};

use runtime_core::{Error, Result};

/// The constrained-decoding engine a backend uses, which decides what a
/// schema may contain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Enforcer {
    /// llama.cpp's JSON-Schema-to-grammar converter (`common/json-schema.cpp`
    /// at build 11434): bounds on integers only, `oneOf` as `anyOf`,
    /// anchored patterns only, formats `date`, `time`, `date-time`, `uuid`.
    LlamaCpp,
    /// llguidance (candle in-process, and vLLM with its `guidance`
    /// backend): the draft 2020-12 keywords it implements.
    LlGuidance,
    /// An engine elsewhere whose enforcement is not known here: nothing is
    /// refused up front, and every answer is validated after.
    Unknown,
}

impl Enforcer {
    /// The engine's name, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::LlamaCpp => "llama.cpp",
            Self::LlGuidance => "llguidance",
            Self::Unknown => "the remote engine",
        }
    }
}

/// Keywords that describe a schema without constraining an answer.
const METADATA: &[&str] = &[
    "$schema",
    "$id",
    "id",
    "$anchor",
    "$comment",
    "$defs",
    "definitions",
    "$vocabulary",
    "title",
    "description",
    "default",
    "examples",
    "deprecated",
    "readOnly",
    "writeOnly",
    "contentMediaType",
    "contentEncoding",
    "contentSchema",
];

/// Every constraining keyword of JSON Schema draft 2020-12 (and the older
/// drafts' ones): a key outside this list and [`METADATA`] is not a keyword
/// (`x-...`, OpenAPI's `nullable`) and constrains nothing for any validator.
const KEYWORDS: &[&str] = &[
    "type",
    "enum",
    "const",
    "multipleOf",
    "maximum",
    "exclusiveMaximum",
    "minimum",
    "exclusiveMinimum",
    "maxLength",
    "minLength",
    "pattern",
    "format",
    "items",
    "prefixItems",
    "additionalItems",
    "unevaluatedItems",
    "contains",
    "maxContains",
    "minContains",
    "maxItems",
    "minItems",
    "uniqueItems",
    "properties",
    "patternProperties",
    "additionalProperties",
    "unevaluatedProperties",
    "propertyNames",
    "maxProperties",
    "minProperties",
    "required",
    "dependentRequired",
    "dependentSchemas",
    "dependencies",
    "allOf",
    "anyOf",
    "oneOf",
    "not",
    "if",
    "then",
    "else",
    "$ref",
    "$dynamicRef",
    "$dynamicAnchor",
    "$recursiveRef",
    "$recursiveAnchor",
];

/// What each engine enforces, by keyword.
fn enforces(enforcer: Enforcer, keyword: &str) -> bool {
    match enforcer {
        Enforcer::Unknown => true,
        Enforcer::LlamaCpp => matches!(
            keyword,
            "type"
                | "enum"
                | "const"
                | "maximum"
                | "exclusiveMaximum"
                | "minimum"
                | "exclusiveMinimum"
                | "maxLength"
                | "minLength"
                | "pattern"
                | "format"
                | "items"
                | "prefixItems"
                | "maxItems"
                | "minItems"
                | "properties"
                | "additionalProperties"
                | "required"
                | "allOf"
                | "anyOf"
                | "$ref"
        ),
        Enforcer::LlGuidance => matches!(
            keyword,
            "type"
                | "enum"
                | "const"
                | "multipleOf"
                | "maximum"
                | "exclusiveMaximum"
                | "minimum"
                | "exclusiveMinimum"
                | "maxLength"
                | "minLength"
                | "pattern"
                | "format"
                | "items"
                | "prefixItems"
                | "additionalItems"
                | "maxItems"
                | "minItems"
                | "properties"
                | "patternProperties"
                | "additionalProperties"
                | "maxProperties"
                | "minProperties"
                | "required"
                | "allOf"
                | "anyOf"
                | "oneOf"
                | "$ref"
        ),
    }
}

/// The `format` values each engine enforces.
fn enforces_format(enforcer: Enforcer, format: &str) -> bool {
    match enforcer {
        Enforcer::Unknown => true,
        Enforcer::LlamaCpp => {
            matches!(format, "date" | "time" | "date-time" | "uuid")
                || (format.len() == 5
                    && format.starts_with("uuid")
                    && ('1'..='5').any(|v| format.ends_with(v)))
        }
        Enforcer::LlGuidance => matches!(
            format,
            "date-time"
                | "time"
                | "date"
                | "duration"
                | "email"
                | "hostname"
                | "ipv4"
                | "ipv6"
                | "uuid"
                | "uri"
        ),
    }
}

/// Refuses a schema that holds something `enforcer` would not enforce,
/// naming the keyword and where it is (`field` is the request field the
/// schema came in, for the error).
pub fn check_enforceable(schema: &Value, enforcer: Enforcer, field: &str) -> Result<()> {
    if enforcer == Enforcer::Unknown {
        return Ok(());
    }
    walk(schema, "#", enforcer).map_err(|refusal| {
        Error::invalid_request(
            field.to_owned(),
            format!(
                "{refusal}; {} cannot enforce it during generation, so it is refused rather \
                 than answered unchecked",
                enforcer.name()
            ),
        )
    })
}

fn walk(schema: &Value, path: &str, enforcer: Enforcer) -> std::result::Result<(), String> {
    let object = match schema {
        Value::Bool(_) => return Ok(()),
        Value::Object(object) => object,
        _ => return Err(format!("has a schema at {path} that is not an object")),
    };
    for (key, value) in object {
        let key = key.as_str();
        if METADATA.contains(&key) {
            continue;
        }
        if !KEYWORDS.contains(&key) {
            // Not a JSON Schema keyword: no validator reads it either.
            continue;
        }
        if !enforces(enforcer, key) {
            return Err(format!("uses `{key}` at {path}"));
        }
        match key {
            "format" => {
                let format = value.as_str().unwrap_or_default();
                if !enforces_format(enforcer, format) {
                    return Err(format!("uses `format: {format}` at {path}"));
                }
            }
            "$ref" => {
                let target = value.as_str().unwrap_or_default();
                if !target.starts_with('#') {
                    return Err(format!(
                        "refers to `{target}` at {path}; only references within the schema \
                         (`#/$defs/...`) are followed"
                    ));
                }
                if enforcer == Enforcer::LlamaCpp
                    && let Some(beside) = object
                        .keys()
                        .find(|k| k.as_str() != "$ref" && KEYWORDS.contains(&k.as_str()))
                {
                    return Err(format!(
                        "uses `{beside}` beside `$ref` at {path} (it would be ignored)"
                    ));
                }
            }
            "pattern" if enforcer == Enforcer::LlamaCpp => {
                let pattern = value.as_str().unwrap_or_default();
                if !(pattern.len() >= 2 && pattern.starts_with('^') && pattern.ends_with('$')) {
                    return Err(format!(
                        "uses a `pattern` not anchored with `^` and `$` at {path}"
                    ));
                }
            }
            "minimum" | "maximum" | "exclusiveMinimum" | "exclusiveMaximum"
                if enforcer == Enforcer::LlamaCpp && !integer_only(object) =>
            {
                return Err(format!(
                    "uses `{key}` on a non-integer at {path} (bounds are enforced on \
                     `\"type\": \"integer\"` only)"
                ));
            }
            _ => {}
        }
    }
    if enforcer == Enforcer::LlamaCpp
        && object.contains_key("minimum")
        && object.contains_key("exclusiveMinimum")
    {
        return Err(format!(
            "uses both `minimum` and `exclusiveMinimum` at {path}"
        ));
    }
    if enforcer == Enforcer::LlamaCpp
        && object.contains_key("maximum")
        && object.contains_key("exclusiveMaximum")
    {
        return Err(format!(
            "uses both `maximum` and `exclusiveMaximum` at {path}"
        ));
    }
    for (key, value) in object {
        match key.as_str() {
            "properties" | "patternProperties" | "$defs" | "definitions" | "dependentSchemas" => {
                for (name, sub) in value.as_object().into_iter().flatten() {
                    walk(
                        sub,
                        &format!("{path}/{key}/{}", pointer_escape(name)),
                        enforcer,
                    )?;
                }
            }
            "items" | "prefixItems" | "allOf" | "anyOf" | "oneOf" => match value {
                Value::Array(items) => {
                    for (i, sub) in items.iter().enumerate() {
                        walk(sub, &format!("{path}/{key}/{i}"), enforcer)?;
                    }
                }
                sub => walk(sub, &format!("{path}/{key}"), enforcer)?,
            },
            "additionalProperties"
            | "additionalItems"
            | "not"
            | "if"
            | "then"
            | "else"
            | "contains"
            | "propertyNames"
            | "unevaluatedItems"
            | "unevaluatedProperties" => {
                walk(value, &format!("{path}/{key}"), enforcer)?;
            }
            _ => {}
        }
    }
    Ok(())
}

/// Whether the schema's `type` admits integers only.
fn integer_only(object: &Map<String, Value>) -> bool {
    match object.get("type") {
        Some(Value::String(kind)) => kind == "integer",
        Some(Value::Array(kinds)) => !kinds.is_empty() && kinds.iter().all(|k| k == "integer"),
        _ => false,
    }
}

fn pointer_escape(name: &str) -> String {
    name.replace('~', "~0").replace('/', "~1")
}

/// A compiled schema that answers are validated against.
pub struct Validator {
    inner: jsonschema::Validator,
}

impl std::fmt::Debug for Validator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Validator").finish_non_exhaustive()
    }
}

impl Validator {
    /// Compiles `schema` (draft 2020-12 unless it says otherwise, formats
    /// checked); a schema that does not compile is the caller's mistake in
    /// `field`.
    pub fn new(schema: &Value, field: &str) -> Result<Self> {
        let inner = jsonschema::options()
            .should_validate_formats(true)
            .build(schema)
            .map_err(|err| {
                Error::invalid_request(
                    field.to_owned(),
                    format!("is not a usable JSON Schema: {err}"),
                )
            })?;
        Ok(Self { inner })
    }

    /// The first way `value` breaks the schema, with where: `None` when it
    /// is valid.
    pub fn first_error(&self, value: &Value) -> Option<String> {
        self.inner.validate(value).err().map(|err| {
            let at = err.instance_path().to_string();
            let at = if at.is_empty() { "/".to_owned() } else { at };
            format!("at {at}: {err}")
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn refusal(schema: Value, enforcer: Enforcer) -> String {
        match check_enforceable(&schema, enforcer, "response_format.json_schema.schema") {
            Err(Error::InvalidRequest { reason, .. }) => reason,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_keyword_no_engine_enforces_is_refused_by_name_and_place() {
        let schema = json!({
            "type": "object",
            "properties": {"tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": true}},
        });
        for enforcer in [Enforcer::LlamaCpp, Enforcer::LlGuidance] {
            let reason = refusal(schema.clone(), enforcer);
            assert!(
                reason.contains("`uniqueItems` at #/properties/tags"),
                "{reason}"
            );
        }
        check_enforceable(&schema, Enforcer::Unknown, "x").unwrap();
    }

    #[test]
    fn llama_cpp_bounds_numbers_only_when_they_are_integers() {
        let integer = json!({"type": "integer", "minimum": 1, "maximum": 5});
        check_enforceable(&integer, Enforcer::LlamaCpp, "x").unwrap();
        let number = json!({"type": "number", "minimum": 0.5});
        let reason = refusal(number.clone(), Enforcer::LlamaCpp);
        assert!(
            reason.contains("`minimum` on a non-integer at #"),
            "{reason}"
        );
        check_enforceable(&number, Enforcer::LlGuidance, "x").unwrap();
    }

    #[test]
    fn property_names_that_look_like_keywords_are_not_keywords() {
        let schema = json!({
            "type": "object",
            "properties": {"not": {"type": "string"}, "uniqueItems": {"type": "boolean"}},
            "required": ["not"],
        });
        check_enforceable(&schema, Enforcer::LlamaCpp, "x").unwrap();
        check_enforceable(&schema, Enforcer::LlGuidance, "x").unwrap();
    }

    #[test]
    fn unanchored_patterns_and_unknown_formats_are_refused_for_llama_cpp() {
        let reason = refusal(
            json!({"type": "string", "pattern": "[a-z]+"}),
            Enforcer::LlamaCpp,
        );
        assert!(reason.contains("not anchored"), "{reason}");
        check_enforceable(
            &json!({"type": "string", "pattern": "^[a-z]+$"}),
            Enforcer::LlamaCpp,
            "x",
        )
        .unwrap();
        let reason = refusal(
            json!({"type": "string", "format": "email"}),
            Enforcer::LlamaCpp,
        );
        assert!(reason.contains("`format: email`"), "{reason}");
        check_enforceable(
            &json!({"type": "string", "format": "email"}),
            Enforcer::LlGuidance,
            "x",
        )
        .unwrap();
    }

    #[test]
    fn references_outside_the_schema_are_refused() {
        let reason = refusal(
            json!({"$ref": "https://example.com/s.json"}),
            Enforcer::LlGuidance,
        );
        assert!(
            reason.contains("only references within the schema"),
            "{reason}"
        );
        let local = json!({"$defs": {"a": {"type": "string"}}, "$ref": "#/$defs/a"});
        check_enforceable(&local, Enforcer::LlGuidance, "x").unwrap();
    }

    #[test]
    fn the_validator_names_the_first_violation_and_where() {
        let validator = Validator::new(
            &json!({"type": "object", "properties": {"n": {"type": "integer", "maximum": 3}}}),
            "schema",
        )
        .unwrap();
        assert_eq!(validator.first_error(&json!({"n": 2})), None);
        let error = validator.first_error(&json!({"n": 7})).unwrap();
        assert!(error.starts_with("at /n: "), "{error}");
        let bad = Validator::new(&json!({"type": 12}), "schema").unwrap_err();
        assert!(matches!(bad, Error::InvalidRequest { .. }), "{bad:?}");
    }
}
