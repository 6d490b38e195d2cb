//! Tool calls as text: the schema a required call is constrained to
//! ([`call_schema`]), and the two readers of calls out of generated text,
//! incremental so a stream carries the call as it is generated:
//! [`JsonCalls`] for constrained output (`{"name": ..., "arguments": {...}}`,
//! or an array of them), [`TaggedCalls`] for Hermes-style
//! `<tool_call>{...}</tool_call>` blocks amid free text.

use serde_json::{Value, json};

use runtime_core::{Tool, ToolCall, ToolCallDelta};

/// The schema of a call of one of `tools`: `{"name": <one of them>,
/// "arguments": <its parameters>}`; with `parallel`, an array of one such
/// call per tool at most.
pub fn call_schema(tools: &[&Tool], parallel: bool) -> Value {
    let mut defs = serde_json::Map::new();
    let one: Vec<Value> = tools
        .iter()
        .enumerate()
        .map(|(i, tool)| {
            let parameters = tool.parameters_schema();
            // A schema with references keeps them pointing into itself: it
            // moves under `$defs` whole and the references follow it.
            let arguments = if has_refs(&parameters) {
                let key = format!("tool{i}");
                let moved = rebase_refs(parameters, &format!("#/$defs/{key}"));
                defs.insert(key.clone(), moved);
                json!({"$ref": format!("#/$defs/{key}")})
            } else {
                parameters
            };
            json!({
                "type": "object",
                "properties": {"name": {"const": tool.name}, "arguments": arguments},
                "required": ["name", "arguments"],
                "additionalProperties": false,
            })
        })
        .collect();
    let mut call = match <[Value; 1]>::try_from(one) {
        Ok([only]) => only,
        Err(many) => json!({"anyOf": many}),
    };
    if parallel {
        // At most as many calls as there are tools: a small model asked for
        // "one or more" repeats its calls until the token limit cuts the
        // answer off. A call the answer could not fit comes in a later turn.
        call = json!({"type": "array", "items": call, "minItems": 1, "maxItems": tools.len()});
    }
    if !defs.is_empty()
        && let Value::Object(object) = &mut call
    {
        object.insert("$defs".to_owned(), Value::Object(defs));
    }
    call
}

fn has_refs(schema: &Value) -> bool {
    match schema {
        Value::Object(object) => object
            .iter()
            .any(|(key, value)| key == "$ref" || has_refs(value)),
        Value::Array(items) => items.iter().any(has_refs),
        _ => false,
    }
}

/// `schema` with every local reference (`#...`) made relative to `base`.
fn rebase_refs(schema: Value, base: &str) -> Value {
    match schema {
        Value::Object(object) => Value::Object(
            object
                .into_iter()
                .map(|(key, value)| {
                    let value = match (&*key, value) {
                        ("$ref", Value::String(target)) if target.starts_with('#') => {
                            Value::String(format!("{base}{}", &target[1..]))
                        }
                        (_, value) => rebase_refs(value, base),
                    };
                    (key, value)
                })
                .collect(),
        ),
        Value::Array(items) => {
            Value::Array(items.into_iter().map(|v| rebase_refs(v, base)).collect())
        }
        other => other,
    }
}

/// A fresh call id, `call_` and 24 letters and digits.
pub fn call_id() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut bytes = [0u8; 24];
    if getrandom::fill(&mut bytes).is_err() {
        // No entropy source: ids need to be distinct within an answer, not secret.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        bytes
            .iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = (nanos >> (i % 16 * 8)) as u8 ^ i as u8);
    }
    let tail: String = bytes
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect();
    format!("call_{tail}")
}

/// One call being read.
#[derive(Debug)]
struct Scanned {
    id: String,
    name: Option<String>,
    /// Byte range of the arguments value in the text, its end once known.
    arguments: Option<(usize, Option<usize>)>,
    /// Whether its first piece went out.
    announced: bool,
    /// Bytes of its arguments sent so far.
    sent: usize,
}

/// Where the lexer is relative to the call object's keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    /// Outside any call object (before it, between array items, after).
    Outside,
    /// Inside a call object, before a key.
    BeforeKey,
    /// Inside a key string that started at this byte.
    Key(usize),
    /// After a key, before its value.
    BeforeValue,
    /// Inside the value of the key, which started at this byte.
    Value(usize),
}

/// Reads constrained call output (`{"name","arguments"}`, or an array of
/// them with `parallel`) as it is generated, and turns it into
/// [`ToolCallDelta`]s: each call's id and name once its name is complete,
/// then its arguments' text as it grows (held back until the name is known,
/// whatever order the keys come in).
#[derive(Debug)]
pub struct JsonCalls {
    parallel: bool,
    text: String,
    /// Bytes of `text` lexed.
    lexed: usize,
    depth: usize,
    in_string: bool,
    escaped: bool,
    at: At,
    key: String,
    calls: Vec<Scanned>,
}

impl JsonCalls {
    /// A reader of one call, or with `parallel` an array of calls.
    pub fn new(parallel: bool) -> Self {
        Self {
            parallel,
            text: String::new(),
            lexed: 0,
            depth: 0,
            in_string: false,
            escaped: false,
            at: At::Outside,
            key: String::new(),
            calls: Vec::new(),
        }
    }

    /// The depth inside a call object.
    fn call_depth(&self) -> usize {
        if self.parallel { 2 } else { 1 }
    }

    /// The text read so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Takes more generated text; returns the call pieces it completes.
    pub fn push(&mut self, text: &str) -> Vec<ToolCallDelta> {
        self.text.push_str(text);
        self.lex();
        self.pieces()
    }

    fn lex(&mut self) {
        let call_depth = self.call_depth();
        for i in self.lexed..self.text.len() {
            let byte = self.text.as_bytes()[i];
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                } else if byte == b'\\' {
                    self.escaped = true;
                } else if byte == b'"' {
                    self.in_string = false;
                    if let At::Key(from) = self.at {
                        self.key = serde_json::from_str(&self.text[from..=i]).unwrap_or_default();
                        self.at = At::BeforeValue;
                    } else if let At::Value(from) = self.at
                        && self.depth == call_depth
                    {
                        // A string value at the call's level ends here.
                        self.value_ended(from, i + 1);
                    }
                }
                continue;
            }
            match byte {
                b'"' => {
                    self.in_string = true;
                    match self.at {
                        At::BeforeKey if self.depth == call_depth => self.at = At::Key(i),
                        At::BeforeValue => self.at = At::Value(i),
                        _ => {}
                    }
                }
                b'{' | b'[' => {
                    if self.at == At::BeforeValue {
                        self.at = At::Value(i);
                    }
                    self.depth += 1;
                    if byte == b'{' && self.depth == call_depth && self.at == At::Outside {
                        self.calls.push(Scanned {
                            id: call_id(),
                            name: None,
                            arguments: None,
                            announced: false,
                            sent: 0,
                        });
                        self.at = At::BeforeKey;
                    }
                    if let At::Value(from) = self.at
                        && self.key == "arguments"
                        && self.depth == call_depth + 1
                        && from == i
                        && let Some(call) = self.calls.last_mut()
                    {
                        call.arguments = Some((from, None));
                    }
                }
                b'}' | b']' => {
                    self.depth = self.depth.saturating_sub(1);
                    if let At::Value(from) = self.at
                        && self.depth == call_depth
                    {
                        self.value_ended(from, i + 1);
                    } else if self.depth + 1 == call_depth && byte == b'}' {
                        // The call object closed (a scalar value may end here).
                        if let At::Value(from) = self.at {
                            self.value_ended(from, i);
                        }
                        self.at = At::Outside;
                    }
                }
                b',' if self.depth == call_depth => {
                    if let At::Value(from) = self.at {
                        self.value_ended(from, i);
                    }
                    self.at = At::BeforeKey;
                }
                b if self.at == At::BeforeValue && !b.is_ascii_whitespace() && b != b':' => {
                    // A scalar value (number, true, false, null).
                    self.at = At::Value(i);
                    if self.key == "arguments"
                        && let Some(call) = self.calls.last_mut()
                    {
                        call.arguments = Some((i, None));
                    }
                }
                _ => {}
            }
        }
        self.lexed = self.text.len();
    }

    /// The value of the current key spans `from..to`.
    fn value_ended(&mut self, from: usize, to: usize) {
        let raw = self.text[from..to].trim_end();
        let to = from + raw.len();
        let key = std::mem::take(&mut self.key);
        if let Some(call) = self.calls.last_mut() {
            match key.as_str() {
                "name" => call.name = serde_json::from_str::<String>(raw).ok(),
                "arguments" => call.arguments = Some((from, Some(to))),
                _ => {}
            }
        }
        self.at = At::BeforeKey;
    }

    fn pieces(&mut self) -> Vec<ToolCallDelta> {
        let mut pieces = Vec::new();
        let lexed = self.lexed;
        for (index, call) in self.calls.iter_mut().enumerate() {
            let index = index as u32;
            let Some(name) = &call.name else { continue };
            if !call.announced {
                call.announced = true;
                pieces.push(ToolCallDelta::start(index, call.id.clone(), name.clone()));
            }
            if let Some((from, to)) = call.arguments {
                let end = to.unwrap_or(lexed);
                let ready = &self.text[from + call.sent..end.max(from + call.sent)];
                if !ready.is_empty() {
                    call.sent += ready.len();
                    pieces.push(ToolCallDelta::arguments(index, ready));
                }
            }
        }
        pieces
    }

    /// The calls of the whole text, once generation ended: an error says
    /// what is wrong with its shape (the schema's own checks come after).
    pub fn finish(mut self) -> Result<(Vec<ToolCall>, Vec<ToolCallDelta>), String> {
        let rest = self.pieces();
        let value: Value = serde_json::from_str(&self.text).map_err(|err| {
            format!(
                "is not a complete JSON call ({err}): {}",
                excerpt(&self.text)
            )
        })?;
        let count = match (&value, self.parallel) {
            (Value::Array(items), true) => items.len(),
            (Value::Object(_), false) => 1,
            _ => {
                return Err(format!(
                    "is not a call of the expected shape: {}",
                    excerpt(&self.text)
                ));
            }
        };
        if count != self.calls.len() {
            return Err(format!(
                "holds {count} calls, {} of them readable",
                self.calls.len()
            ));
        }
        let calls = self
            .calls
            .into_iter()
            .map(|call| match (call.name, call.arguments) {
                (Some(name), Some((from, Some(to)))) => {
                    Ok(ToolCall::new(call.id, name, &self.text[from..to]))
                }
                _ => Err(format!(
                    "has a call without a name or arguments: {}",
                    excerpt(&self.text)
                )),
            })
            .collect::<Result<_, _>>()?;
        Ok((calls, rest))
    }
}

/// The opening and closing tags of a Hermes-style call.
const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// What [`TaggedCalls`] makes of generated text.
#[derive(Debug, PartialEq)]
pub enum Piece {
    /// Text outside any call.
    Text(String),
    /// A piece of a call.
    Call(ToolCallDelta),
}

/// Reads free text in which calls come as `<tool_call>{"name": ...,
/// "arguments": {...}}</tool_call>` (Hermes, Qwen), or, when the whole
/// answer is one JSON object with `name` and `arguments` (or
/// `parameters`), that call. Text is passed on as it comes except what
/// could be the start of a tag, or all of it when it opens with `{`.
#[derive(Debug, Default)]
pub struct TaggedCalls {
    /// Text not yet passed on.
    pending: String,
    /// Inside a call: its text so far.
    inside: Option<String>,
    /// Whether any text went out (a bare JSON call must be all there is).
    said: bool,
    calls: Vec<ToolCall>,
}

impl TaggedCalls {
    /// A reader with nothing read.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes more text; returns what can be passed on, or the error of a
    /// call that is not valid JSON.
    pub fn push(&mut self, text: &str) -> Result<Vec<Piece>, String> {
        self.pending.push_str(text);
        let mut out = Vec::new();
        loop {
            if let Some(inside) = &mut self.inside {
                inside.push_str(&std::mem::take(&mut self.pending));
                let Some(end) = inside.find(CLOSE) else { break };
                let after = inside[end + CLOSE.len()..].to_owned();
                let body = inside[..end].to_owned();
                self.inside = None;
                self.pending = after;
                out.extend(self.call(&body)?);
                continue;
            }
            if !self.said && self.pending.trim_start().starts_with('{') {
                // Maybe a bare JSON call: decided at the end.
                break;
            }
            if let Some(start) = self.pending.find(OPEN) {
                let before = self.pending[..start].to_owned();
                self.inside = Some(self.pending[start + OPEN.len()..].to_owned());
                self.pending.clear();
                self.text(before, &mut out);
                continue;
            }
            // Hold back a tail that may be the start of a tag.
            let keep = (1..OPEN.len())
                .rev()
                .find(|n| self.pending.ends_with(&OPEN[..*n]))
                .unwrap_or(0);
            let split = self.pending.len() - keep;
            let ready = self.pending[..split].to_owned();
            self.pending.drain(..split);
            self.text(ready, &mut out);
            break;
        }
        Ok(out)
    }

    fn text(&mut self, text: String, out: &mut Vec<Piece>) {
        let only_space = text.trim().is_empty();
        if text.is_empty() || (only_space && !self.said) {
            return;
        }
        self.said = true;
        out.push(Piece::Text(text));
    }

    /// A call's body: its id and name, then all its arguments at once.
    fn call(&mut self, body: &str) -> Result<Vec<Piece>, String> {
        let value: Value = serde_json::from_str(body.trim()).map_err(|err| {
            format!(
                "holds a <tool_call> that is not JSON ({err}): {}",
                excerpt(body)
            )
        })?;
        let (name, arguments) = call_parts(&value)
            .ok_or_else(|| format!("holds a <tool_call> without a name: {}", excerpt(body)))?;
        let index = self.calls.len() as u32;
        let call = ToolCall::new(call_id(), name, arguments);
        let pieces = vec![
            Piece::Call(ToolCallDelta::start(
                index,
                call.id.clone(),
                call.name.clone(),
            )),
            Piece::Call(ToolCallDelta::arguments(index, call.arguments.clone())),
        ];
        self.calls.push(call);
        Ok(pieces)
    }

    /// The end of the text: what is still held back, and every call. A
    /// `known` function name is needed for a bare JSON answer to count as a
    /// call.
    pub fn finish(mut self, known: &[&str]) -> Result<(Vec<Piece>, Vec<ToolCall>), String> {
        if let Some(inside) = &self.inside {
            return Err(format!("ends inside a <tool_call>: {}", excerpt(inside)));
        }
        let mut out = Vec::new();
        let rest = std::mem::take(&mut self.pending);
        if !self.said
            && let Ok(value) = serde_json::from_str::<Value>(rest.trim())
            && let Some((name, _)) = call_parts(&value)
            && known.contains(&name.as_str())
        {
            out.extend(self.call(rest.trim())?);
        } else {
            self.text(rest, &mut out);
        }
        Ok((out, self.calls))
    }
}

/// `{"name": ..., "arguments" | "parameters": ...}`: the name and the
/// arguments as JSON text (an object; `{}` when absent).
fn call_parts(value: &Value) -> Option<(String, String)> {
    let name = value.get("name")?.as_str()?.to_owned();
    let arguments = value
        .get("arguments")
        .or_else(|| value.get("parameters"))
        .cloned()
        .unwrap_or_else(|| json!({}));
    let arguments = match arguments {
        // Some models write the arguments as a JSON string.
        Value::String(text) => text,
        other => other.to_string(),
    };
    Some((name, arguments))
}

/// At most 200 bytes of `text`, for messages.
pub(crate) fn excerpt(text: &str) -> String {
    const MAX: usize = 200;
    if text.len() <= MAX {
        return format!("{text:?}");
    }
    let mut end = MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}...", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Tool {
        Tool::function(
            "get_weather",
            json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
        )
    }

    /// Feeds `text` in pieces of `size` bytes (at char boundaries).
    fn feed(reader: &mut JsonCalls, text: &str, size: usize) -> Vec<ToolCallDelta> {
        let mut out = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let mut cut = size.min(rest.len());
            while !rest.is_char_boundary(cut) {
                cut += 1;
            }
            out.extend(reader.push(&rest[..cut]));
            rest = &rest[cut..];
        }
        out
    }

    fn assembled(pieces: &[ToolCallDelta]) -> Vec<(String, String)> {
        let mut calls: Vec<(String, String)> = Vec::new();
        for piece in pieces {
            if let Some(name) = &piece.name {
                assert_eq!(piece.index as usize, calls.len());
                calls.push((name.clone(), String::new()));
            }
            calls[piece.index as usize].1.push_str(&piece.arguments);
        }
        calls
    }

    #[test]
    fn a_streamed_call_assembles_to_the_call_read_whole_whatever_the_chunking() {
        let text = r#"{"name": "get_weather", "arguments": {"city": "Paris \"Île\" {}", "n": [1, {"a": 2}]}}"#;
        for size in [1, 2, 3, 7, 100] {
            let mut reader = JsonCalls::new(false);
            let mut pieces = feed(&mut reader, text, size);
            let (calls, rest) = reader.finish().unwrap();
            pieces.extend(rest);
            assert_eq!(calls.len(), 1);
            assert_eq!(calls[0].name, "get_weather");
            assert_eq!(
                calls[0].arguments,
                r#"{"city": "Paris \"Île\" {}", "n": [1, {"a": 2}]}"#
            );
            assert_eq!(
                assembled(&pieces),
                vec![(calls[0].name.clone(), calls[0].arguments.clone())],
                "chunks of {size}"
            );
            assert_eq!(pieces[0].id.as_deref(), Some(calls[0].id.as_str()));
        }
    }

    #[test]
    fn arguments_before_the_name_are_held_until_the_name_is_known() {
        let text = r#"{"arguments":{"city":"Oslo"},"name":"get_weather"}"#;
        let mut reader = JsonCalls::new(false);
        let early = reader.push(&text[..30]);
        assert!(early.is_empty(), "{early:?}");
        let mut pieces = reader.push(&text[30..]);
        let (calls, rest) = reader.finish().unwrap();
        pieces.extend(rest);
        assert_eq!(calls[0].arguments, r#"{"city":"Oslo"}"#);
        assert_eq!(
            assembled(&pieces),
            vec![("get_weather".to_owned(), r#"{"city":"Oslo"}"#.to_owned())]
        );
    }

    #[test]
    fn parallel_calls_are_read_in_order_with_their_own_indexes() {
        let text = r#"[{"name":"a","arguments":{"x":1}},{"name":"b","arguments":{}}]"#;
        let mut reader = JsonCalls::new(true);
        let mut pieces = feed(&mut reader, text, 4);
        let (calls, rest) = reader.finish().unwrap();
        pieces.extend(rest);
        let names: Vec<_> = calls.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(
            assembled(&pieces),
            vec![
                ("a".to_owned(), r#"{"x":1}"#.to_owned()),
                ("b".to_owned(), "{}".to_owned())
            ]
        );
        assert_ne!(calls[0].id, calls[1].id);
    }

    #[test]
    fn a_call_with_a_brace_missing_is_not_a_call() {
        let mut reader = JsonCalls::new(false);
        reader.push(r#"{"name":"get_weather","arguments":{"city":"Oslo"}"#);
        let err = reader.finish().unwrap_err();
        assert!(err.contains("not a complete JSON call"), "{err}");
    }

    #[test]
    fn the_call_schema_names_each_tool_and_keeps_references_working() {
        let with_refs = Tool::function(
            "plan",
            json!({"$defs": {"step": {"type": "string"}}, "type": "object",
                   "properties": {"steps": {"type": "array", "items": {"$ref": "#/$defs/step"}}}}),
        );
        let weather = weather();
        let schema = call_schema(&[&weather, &with_refs], true);
        let validator = crate::schema::Validator::new(&schema, "tools").unwrap();
        let good = json!([{"name": "plan", "arguments": {"steps": ["a"]}},
                          {"name": "get_weather", "arguments": {"city": "x"}}]);
        assert_eq!(validator.first_error(&good), None);
        let bad = json!([{"name": "plan", "arguments": {"steps": [1]}}]);
        assert!(validator.first_error(&bad).is_some());
        let unknown = json!([{"name": "other", "arguments": {}}]);
        assert!(validator.first_error(&unknown).is_some());
        assert!(
            validator.first_error(&json!([])).is_some(),
            "at least one call"
        );
    }

    #[test]
    fn tagged_calls_are_taken_out_of_the_text_and_a_split_tag_is_held_back() {
        let mut reader = TaggedCalls::new();
        let mut pieces = Vec::new();
        for chunk in [
            "Let me look. <tool",
            "_call>\n{\"name\": \"get_weather\", ",
            "\"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>",
        ] {
            pieces.extend(reader.push(chunk).unwrap());
        }
        let (rest, calls) = reader.finish(&["get_weather"]).unwrap();
        pieces.extend(rest);
        assert_eq!(pieces[0], Piece::Text("Let me look. ".to_owned()));
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].arguments, r#"{"city":"Oslo"}"#);
        assert!(matches!(&pieces[1], Piece::Call(d) if d.name.as_deref() == Some("get_weather")));
    }

    #[test]
    fn a_bare_json_call_counts_only_for_a_known_tool_and_text_stays_text() {
        let mut reader = TaggedCalls::new();
        assert!(
            reader
                .push("{\"name\": \"get_weather\",")
                .unwrap()
                .is_empty()
        );
        reader
            .push(" \"parameters\": {\"city\": \"Rome\"}}")
            .unwrap();
        let (_, calls) = reader.finish(&["get_weather"]).unwrap();
        assert_eq!(calls[0].arguments, r#"{"city":"Rome"}"#);

        let mut reader = TaggedCalls::new();
        reader.push("{\"name\": \"someone\"}").unwrap();
        let (rest, calls) = reader.finish(&["get_weather"]).unwrap();
        assert!(calls.is_empty());
        assert_eq!(
            rest,
            vec![Piece::Text("{\"name\": \"someone\"}".to_owned())]
        );

        let mut reader = TaggedCalls::new();
        let out = reader.push("Paris is the capital.").unwrap();
        assert_eq!(out, vec![Piece::Text("Paris is the capital.".to_owned())]);
    }

    #[test]
    fn an_unterminated_tag_is_an_error() {
        let mut reader = TaggedCalls::new();
        reader.push("<tool_call>{\"name\": \"x\"").unwrap();
        assert!(reader.finish(&["x"]).unwrap_err().contains("ends inside"));
    }
}
