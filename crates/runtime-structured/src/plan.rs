//! A request with tools or a schema, planned for one engine: what to send
//! it, and how to check and reshape what comes back.

use std::collections::VecDeque;

use futures::StreamExt;
use serde_json::Value;

#[cfg(test)]
use runtime_core::ChatMessage;
use runtime_core::{
    Error, EventStream, FinishReason, InferenceRequest, InferenceResponse, ResponseFormat, Result,
    StreamEvent, Tool, ToolCall, ToolChoice,
};

use crate::calls::{JsonCalls, Piece, TaggedCalls, call_schema, excerpt};
use crate::prompt::{CallStyle, lowered, tools_note, with_note};
use crate::schema::{Enforcer, Validator, check_enforceable};

/// What an engine does for tools and schemas by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Support {
    /// Whose constrained decoding enforces a `json_schema`.
    pub enforcer: Enforcer,
    /// Whether the engine reads `auto` tool calls out of its own output
    /// (llama-server with `--jinja`, vLLM with a tool parser). Without it,
    /// calls are asked for as `<tool_call>` tags and read here.
    pub native_auto: bool,
    /// Whether the engine writes `tools` and earlier calls and results
    /// into the prompt itself (its template, or its own stand-in for a
    /// template that lacks them). Without it they are written here as
    /// text.
    pub renders_tools: bool,
}

/// One request planned for one engine.
#[derive(Debug)]
pub struct Plan {
    engine: InferenceRequest,
    check: Check,
}

/// What is checked of the engine's answer.
#[derive(Debug)]
enum Check {
    /// Plain text; no call may come back.
    Text,
    /// The answer is JSON: an object, or valid against the schema.
    Json(Option<Validator>),
    /// The answer is the call in our constrained format.
    Calls { parallel: bool, tools: Tools },
    /// The engine reads the calls; each is checked.
    Native(Tools),
    /// Text with `<tool_call>` tags, read here.
    Tagged(Tools),
}

/// The request's tools, each with the validator of its arguments.
#[derive(Debug)]
struct Tools(Vec<(String, Validator)>);

impl Tools {
    fn new(tools: &[&Tool]) -> Result<Self> {
        tools
            .iter()
            .map(|tool| {
                let validator = Validator::new(
                    &tool.parameters_schema(),
                    &format!("tools[{}].function.parameters", tool.name),
                )?;
                Ok((tool.name.clone(), validator))
            })
            .collect::<Result<_>>()
            .map(Self)
    }

    fn names(&self) -> Vec<&str> {
        self.0.iter().map(|(name, _)| name.as_str()).collect()
    }

    /// Fails unless `call` names one of the tools with valid arguments.
    fn check(&self, call: &ToolCall) -> Result<()> {
        let Some((_, validator)) = self.0.iter().find(|(name, _)| *name == call.name) else {
            return Err(Error::output_invalid(
                "the tool call",
                format!(
                    "names `{}`, which is not one of the request's tools ({})",
                    call.name,
                    self.names().join(", ")
                ),
            ));
        };
        let what = || format!("the arguments of `{}`", call.name);
        let arguments: Value = serde_json::from_str(&call.arguments).map_err(|err| {
            Error::output_invalid(
                what(),
                format!("are not JSON ({err}): {}", excerpt(&call.arguments)),
            )
        })?;
        match validator.first_error(&arguments) {
            Some(reason) => Err(Error::output_invalid(what(), reason)),
            None => Ok(()),
        }
    }
}

impl Plan {
    /// Plans `request` (already validated) for an engine with `support`:
    /// refuses up front a schema the engine cannot enforce, naming the
    /// keyword.
    pub fn new(request: &InferenceRequest, support: &Support) -> Result<Self> {
        let choice = request.effective_tool_choice();
        let mut engine = request.clone();
        let check = match (&choice, &request.response_format) {
            (ToolChoice::None, format) => {
                // No call may come: the engine is not told of any tool.
                without_tools(&mut engine);
                engine.messages = history(request, support, CallStyle::Tagged);
                match format {
                    Some(ResponseFormat::JsonSchema { schema, .. }) => {
                        const FIELD: &str = "response_format.json_schema.schema";
                        check_enforceable(schema, support.enforcer, FIELD)?;
                        Check::Json(Some(Validator::new(schema, FIELD)?))
                    }
                    Some(ResponseFormat::JsonObject) => Check::Json(None),
                    Some(ResponseFormat::Text) | None => Check::Text,
                    Some(other) => return Err(unplanned("response_format", other)),
                }
            }
            (ToolChoice::Required | ToolChoice::Function(_), _) => {
                let chosen = chosen_tools(request, &choice);
                check_tools(request, support.enforcer)?;
                // A named function is one call; `required` may be several
                // unless the request says otherwise.
                let parallel = matches!(choice, ToolChoice::Required)
                    && request.parallel_tool_calls.unwrap_or(true);
                let style = CallStyle::Json { parallel };
                engine.messages = with_note(
                    history(request, support, style),
                    &tools_note(&chosen, style),
                );
                without_tools(&mut engine);
                engine.response_format = Some(ResponseFormat::JsonSchema {
                    name: "tool_calls".into(),
                    schema: call_schema(&chosen, parallel),
                    strict: true,
                });
                Check::Calls {
                    parallel,
                    tools: Tools::new(&chosen)?,
                }
            }
            (
                ToolChoice::Auto,
                Some(ResponseFormat::JsonObject | ResponseFormat::JsonSchema { .. }),
            ) => {
                return Err(Error::invalid_request(
                    "response_format",
                    "cannot be combined with tools the model may call (`tool_choice` `auto`): \
                     an answer is either a call or the structured text; set `tool_choice` to \
                     `none` for the structured answer, or `required` for a call",
                ));
            }
            (ToolChoice::Auto, None | Some(ResponseFormat::Text)) => {
                let all: Vec<&Tool> = request.tools.iter().collect();
                check_tools(request, support.enforcer)?;
                let tools = Tools::new(&all)?;
                if support.native_auto && support.renders_tools {
                    Check::Native(tools)
                } else {
                    // Calls as tags, which the engine's parser reads when it
                    // has one, and ours when not.
                    let style = CallStyle::Tagged;
                    engine.messages =
                        with_note(history(request, support, style), &tools_note(&all, style));
                    if support.native_auto {
                        Check::Native(tools)
                    } else {
                        without_tools(&mut engine);
                        Check::Tagged(tools)
                    }
                }
            }
            (ToolChoice::Auto, Some(other)) => return Err(unplanned("response_format", other)),
            (other, _) => return Err(unplanned("tool_choice", other)),
        };
        Ok(Self { engine, check })
    }

    /// `request` sent as it is, its answer unchanged: for an engine that
    /// serves plain chat only (whose capabilities refused the rest).
    pub fn plain(request: &InferenceRequest) -> Self {
        Self {
            engine: request.clone(),
            check: Check::Text,
        }
    }

    /// The request to send the engine.
    pub fn engine_request(&self) -> &InferenceRequest {
        &self.engine
    }

    /// Checks and reshapes a whole answer, every choice of it.
    pub fn finish(&self, mut response: InferenceResponse) -> Result<InferenceResponse> {
        let mut choices = response.choices().into_iter();
        let first = choices.next().unwrap_or_default();
        let rest = choices
            .map(|choice| self.answer(choice))
            .collect::<Result<Vec<_>>>()?;
        let first = self.answer(first)?;
        response.content = first.content;
        response.tool_calls = first.tool_calls;
        response.finish_reason = first.finish_reason;
        response.logprobs = first.logprobs;
        response.alternatives = rest;
        Ok(response)
    }

    fn answer(&self, mut choice: runtime_core::Choice) -> Result<runtime_core::Choice> {
        match &self.check {
            Check::Text => no_calls(&choice.tool_calls)?,
            Check::Json(validator) => {
                no_calls(&choice.tool_calls)?;
                check_json(
                    &choice.content,
                    validator.as_ref(),
                    choice.finish_reason.as_ref(),
                )?;
            }
            Check::Calls { parallel, tools } => {
                no_calls(&choice.tool_calls)?;
                cut_off(
                    "the tool call",
                    &choice.content,
                    choice.finish_reason.as_ref(),
                )?;
                let mut reader = JsonCalls::new(*parallel);
                reader.push(&choice.content);
                let (calls, _) = reader
                    .finish()
                    .map_err(|reason| Error::output_invalid("the tool call", reason))?;
                calls.iter().try_for_each(|call| tools.check(call))?;
                choice.content = String::new();
                choice.tool_calls = calls;
                choice.finish_reason = Some(FinishReason::ToolCalls);
            }
            Check::Native(tools) => {
                choice
                    .tool_calls
                    .iter()
                    .try_for_each(|call| tools.check(call))?;
                if !choice.tool_calls.is_empty() {
                    choice.finish_reason = Some(FinishReason::ToolCalls);
                }
            }
            Check::Tagged(tools) => {
                no_calls(&choice.tool_calls)?;
                let mut reader = TaggedCalls::new();
                let mut pieces = reader.push(&choice.content).map_err(tag_error)?;
                let (rest, calls) = reader.finish(&tools.names()).map_err(tag_error)?;
                pieces.extend(rest);
                calls.iter().try_for_each(|call| tools.check(call))?;
                choice.content = pieces
                    .into_iter()
                    .filter_map(|piece| match piece {
                        Piece::Text(text) => Some(text),
                        Piece::Call(_) => None,
                    })
                    .collect::<String>()
                    .trim()
                    .to_owned();
                if !calls.is_empty() {
                    choice.finish_reason = Some(FinishReason::ToolCalls);
                }
                choice.tool_calls = calls;
            }
        }
        Ok(choice)
    }

    /// Checks and reshapes a streamed answer: text and call pieces go out
    /// as they are read, and a failed check is the stream's final event.
    pub fn events(self, events: EventStream) -> EventStream {
        let reader = match &self.check {
            Check::Calls { parallel, .. } => Reader::Json(Some(JsonCalls::new(*parallel))),
            Check::Tagged(_) => Reader::Tagged(Some(TaggedCalls::new())),
            _ => Reader::None,
        };
        let state = Streaming {
            plan: self,
            events,
            reader,
            text: String::new(),
            calls: Vec::new(),
            out: VecDeque::new(),
            done: false,
        };
        Box::new(futures::stream::unfold(state, Streaming::next).boxed())
    }
}

/// The engine is told of no tool: the plan reads or refuses calls itself.
fn without_tools(engine: &mut InferenceRequest) {
    engine.tools.clear();
    engine.tool_choice = None;
    engine.parallel_tool_calls = None;
}

/// The conversation as the engine gets it: as it is where the engine
/// renders tools, with earlier calls and results as text written `style`
/// where it would drop them.
fn history(
    request: &InferenceRequest,
    support: &Support,
    style: CallStyle,
) -> Vec<runtime_core::ChatMessage> {
    if support.renders_tools {
        request.messages.clone()
    } else {
        lowered(&request.messages, style)
    }
}

/// A refusal of a form this version does not know how to plan.
fn unplanned(field: &'static str, what: &dyn std::fmt::Debug) -> Error {
    Error::invalid_request(
        field,
        format!("{what:?} is not served by this version of model-runtime"),
    )
}

/// The tools `choice` lets the model call.
fn chosen_tools<'a>(request: &'a InferenceRequest, choice: &ToolChoice) -> Vec<&'a Tool> {
    match choice {
        ToolChoice::Function(name) => request
            .tools
            .iter()
            .filter(|tool| tool.name == *name)
            .collect(),
        _ => request.tools.iter().collect(),
    }
}

/// Refuses a tool whose parameters the engine could not enforce.
fn check_tools(request: &InferenceRequest, enforcer: Enforcer) -> Result<()> {
    request.tools.iter().enumerate().try_for_each(|(i, tool)| {
        check_enforceable(
            &tool.parameters_schema(),
            enforcer,
            &format!("tools[{i}].function.parameters"),
        )
    })
}

fn no_calls(calls: &[ToolCall]) -> Result<()> {
    match calls.first() {
        None => Ok(()),
        Some(call) => Err(Error::output_invalid(
            "the answer",
            format!(
                "holds a call of `{}`, which the request did not allow (`tool_choice` or `response_format`)",
                call.name
            ),
        )),
    }
}

/// A structured answer cut off by the token limit is not valid, whatever
/// the prefix looks like.
fn cut_off(what: &str, content: &str, finish_reason: Option<&FinishReason>) -> Result<()> {
    match finish_reason {
        Some(FinishReason::Length) => Err(Error::output_invalid(
            what,
            format!(
                "was cut off by the token limit before it was complete; raise `max_tokens` \
                 (it ended {})",
                excerpt(tail(content))
            ),
        )),
        _ => Ok(()),
    }
}

/// The last 120 bytes of `text` or fewer, on a character boundary.
fn tail(text: &str) -> &str {
    let mut start = text.len().saturating_sub(120);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

fn check_json(
    content: &str,
    validator: Option<&Validator>,
    finish_reason: Option<&FinishReason>,
) -> Result<()> {
    cut_off("the answer", content, finish_reason)?;
    let value: Value = serde_json::from_str(content).map_err(|err| {
        Error::output_invalid(
            "the answer",
            format!("is not JSON ({err}): {}", excerpt(content)),
        )
    })?;
    match validator {
        Some(validator) => match validator.first_error(&value) {
            Some(reason) => Err(Error::output_invalid("the answer", reason)),
            None => Ok(()),
        },
        None if value.is_object() => Ok(()),
        None => Err(Error::output_invalid(
            "the answer",
            format!("is JSON but not an object: {}", excerpt(content)),
        )),
    }
}

fn tag_error(reason: String) -> Error {
    Error::output_invalid("the tool call", reason)
}

/// The reader a stream's text goes through.
#[derive(Debug)]
enum Reader {
    None,
    Json(Option<JsonCalls>),
    Tagged(Option<TaggedCalls>),
}

struct Streaming {
    plan: Plan,
    events: EventStream,
    reader: Reader,
    /// The text so far, for a JSON answer's check.
    text: String,
    /// The calls the engine sent, for their check.
    calls: Vec<ToolCall>,
    out: VecDeque<Result<StreamEvent>>,
    done: bool,
}

impl Streaming {
    async fn next(mut self) -> Option<(Result<StreamEvent>, Self)> {
        loop {
            if let Some(item) = self.out.pop_front() {
                return Some((item, self));
            }
            if self.done {
                return None;
            }
            match self.events.next().await {
                Some(Ok(event)) => {
                    if let Err(err) = self.take(event) {
                        self.out.push_back(Err(err));
                        self.done = true;
                    }
                }
                Some(Err(err)) => {
                    self.out.push_back(Err(err));
                    self.done = true;
                }
                None => self.done = true,
            }
        }
    }

    fn take(&mut self, event: StreamEvent) -> Result<()> {
        match event {
            StreamEvent::Delta(text) => match &mut self.reader {
                Reader::Json(Some(reader)) => {
                    let pieces = reader.push(&text);
                    self.out.extend(
                        pieces
                            .into_iter()
                            .map(|piece| Ok(StreamEvent::ToolCall(piece))),
                    );
                }
                Reader::Tagged(Some(reader)) => {
                    let pieces = reader.push(&text).map_err(tag_error)?;
                    self.out.extend(pieces.into_iter().map(piece_event));
                }
                _ => {
                    if matches!(self.plan.check, Check::Json(_)) {
                        self.text.push_str(&text);
                    }
                    self.out.push_back(Ok(StreamEvent::Delta(text)));
                }
            },
            StreamEvent::ToolCall(delta) => {
                if !matches!(self.plan.check, Check::Native(_)) {
                    return Err(Error::output_invalid(
                        "the answer",
                        "holds a tool call, which the request did not allow",
                    ));
                }
                delta.clone().apply_to(&mut self.calls)?;
                self.out.push_back(Ok(StreamEvent::ToolCall(delta)));
            }
            StreamEvent::Finished {
                mut finish_reason,
                usage,
                timings,
            } => {
                self.end(&mut finish_reason)?;
                self.out.push_back(Ok(StreamEvent::Finished {
                    finish_reason,
                    usage,
                    timings,
                }));
                self.done = true;
            }
            other => self.out.push_back(Ok(other)),
        }
        Ok(())
    }

    /// The checks at the end of the answer.
    fn end(&mut self, finish_reason: &mut Option<FinishReason>) -> Result<()> {
        match (&self.plan.check, &mut self.reader) {
            (Check::Json(validator), _) => {
                check_json(&self.text, validator.as_ref(), finish_reason.as_ref())
            }
            (Check::Calls { tools, .. }, Reader::Json(reader)) => {
                let reader = reader.take().expect("the reader ends once");
                cut_off("the tool call", reader.text(), finish_reason.as_ref())?;
                let (calls, rest) = reader
                    .finish()
                    .map_err(|reason| Error::output_invalid("the tool call", reason))?;
                calls.iter().try_for_each(|call| tools.check(call))?;
                self.out.extend(
                    rest.into_iter()
                        .map(|piece| Ok(StreamEvent::ToolCall(piece))),
                );
                *finish_reason = Some(FinishReason::ToolCalls);
                Ok(())
            }
            (Check::Tagged(tools), Reader::Tagged(reader)) => {
                let reader = reader.take().expect("the reader ends once");
                let (rest, calls) = reader.finish(&tools.names()).map_err(tag_error)?;
                calls.iter().try_for_each(|call| tools.check(call))?;
                self.out.extend(rest.into_iter().map(piece_event));
                if !calls.is_empty() {
                    *finish_reason = Some(FinishReason::ToolCalls);
                }
                Ok(())
            }
            (Check::Native(tools), _) => {
                self.calls.iter().try_for_each(|call| tools.check(call))?;
                if !self.calls.is_empty() {
                    *finish_reason = Some(FinishReason::ToolCalls);
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

fn piece_event(piece: Piece) -> Result<StreamEvent> {
    Ok(match piece {
        Piece::Text(text) => StreamEvent::Delta(text),
        Piece::Call(delta) => StreamEvent::ToolCall(delta),
    })
}

/// The messages a plan sends, for tests.
#[cfg(test)]
fn sent(plan: &Plan) -> &[ChatMessage] {
    &plan.engine.messages
}

#[cfg(test)]
mod tests {
    use runtime_core::{Choice, collect_events};
    use serde_json::json;

    use super::*;

    const LLAMA: Support = Support {
        enforcer: Enforcer::LlamaCpp,
        native_auto: true,
        renders_tools: true,
    };
    const PLAIN: Support = Support {
        enforcer: Enforcer::LlGuidance,
        native_auto: false,
        renders_tools: false,
    };

    fn weather() -> Tool {
        Tool::function(
            "weather",
            json!({
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
                "required": ["city"],
                "additionalProperties": false
            }),
        )
    }

    fn asking() -> InferenceRequest {
        InferenceRequest::new(vec![ChatMessage::user("Weather in Paris?")])
            .with_tool(weather())
            .with_tool(Tool::function("time", json!({"type": "object"})))
    }

    fn answered(content: &str) -> InferenceResponse {
        let mut response = InferenceResponse::new(content);
        response.finish_reason = Some(FinishReason::Stop);
        response
    }

    fn stream(pieces: &[&str], finish: FinishReason) -> EventStream {
        let mut events: Vec<Result<StreamEvent>> = pieces
            .iter()
            .map(|piece| Ok(StreamEvent::Delta((*piece).to_owned())))
            .collect();
        events.push(Ok(StreamEvent::Finished {
            finish_reason: Some(finish),
            usage: None,
            timings: None,
        }));
        Box::new(futures::stream::iter(events))
    }

    #[test]
    fn a_required_call_becomes_a_schema_constraint_without_tools_for_the_engine() {
        let plan = Plan::new(&asking().with_tool_choice(ToolChoice::Required), &LLAMA).unwrap();
        let engine = plan.engine_request();
        assert!(engine.tools.is_empty() && engine.tool_choice.is_none());
        let Some(ResponseFormat::JsonSchema { schema, .. }) = &engine.response_format else {
            panic!("no schema: {engine:?}");
        };
        // Parallel by default: an array of calls of either tool.
        assert_eq!(schema["type"], "array");
        assert_eq!(sent(&plan)[0].role, runtime_core::Role::System);
        assert!(sent(&plan)[0].content.contains("\"name\":\"weather\""));
    }

    #[test]
    fn a_constrained_answer_becomes_checked_calls() {
        let request = asking().with_tool_choice(ToolChoice::Function("weather".into()));
        let plan = Plan::new(&request, &LLAMA).unwrap();
        let response = plan
            .finish(answered(
                r#"{"name":"weather","arguments":{"city":"Paris","days":2}}"#,
            ))
            .unwrap();
        assert_eq!(response.content, "");
        assert_eq!(response.finish_reason, Some(FinishReason::ToolCalls));
        assert_eq!(response.tool_calls.len(), 1);
        assert_eq!(response.tool_calls[0].name, "weather");
        assert!(response.tool_calls[0].id.starts_with("call_"));
        assert_eq!(
            response.tool_calls[0].arguments_json().unwrap(),
            json!({"city": "Paris", "days": 2})
        );
    }

    #[test]
    fn invalid_arguments_unknown_tools_and_cut_off_calls_are_output_invalid() {
        let request = asking().with_tool_choice(ToolChoice::Function("weather".into()));
        let plan = Plan::new(&request, &LLAMA).unwrap();
        for (content, finish, expected) in [
            (
                r#"{"name":"weather","arguments":{"city":"Paris","days":0}}"#,
                FinishReason::Stop,
                "/days",
            ),
            (
                r#"{"name":"weather","arguments":{"town":"Paris"}}"#,
                FinishReason::Stop,
                "town",
            ),
            (
                r#"{"name":"weather","arguments":{}}"#,
                FinishReason::Stop,
                "city",
            ),
            (
                r#"{"name":"nope","arguments":{}}"#,
                FinishReason::Stop,
                "nope",
            ),
            (
                r#"{"name":"weather","arguments":{"city":"Par"#,
                FinishReason::Length,
                "token limit",
            ),
            (
                r#"{"name":"weather","arguments":{"city":"Par"#,
                FinishReason::Stop,
                "complete JSON",
            ),
        ] {
            let mut response = answered(content);
            response.finish_reason = Some(finish);
            match plan.finish(response) {
                Err(Error::OutputInvalid { reason, .. }) => {
                    assert!(reason.contains(expected), "{content}: {reason}")
                }
                other => panic!("{content}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_json_schema_answer_is_validated_and_a_cut_off_one_refused() {
        let request = InferenceRequest::new(vec![ChatMessage::user("x")]).with_json_schema(
            "n",
            json!({"type": "object", "properties": {"n": {"type": "integer", "maximum": 3}}, "required": ["n"]}),
        );
        let plan = Plan::new(&request, &LLAMA).unwrap();
        assert_eq!(
            plan.engine_request().response_format,
            request.response_format
        );
        assert!(plan.finish(answered(r#"{"n":2}"#)).is_ok());
        for bad in [r#"{"n":4}"#, r#"{"m":1}"#, "not json", r#"{"n":"#] {
            assert!(
                matches!(plan.finish(answered(bad)), Err(Error::OutputInvalid { .. })),
                "{bad}"
            );
        }
        let mut cut = answered(r#"{"n":2}"#);
        cut.finish_reason = Some(FinishReason::Length);
        assert!(matches!(plan.finish(cut), Err(Error::OutputInvalid { .. })));
    }

    #[test]
    fn every_choice_of_several_is_checked() {
        let request = InferenceRequest::new(vec![ChatMessage::user("x")])
            .with_response_format(ResponseFormat::JsonObject)
            .with_n(2);
        let plan = Plan::new(&request, &LLAMA).unwrap();
        let mut response = answered("{}");
        let mut bad = Choice::default();
        bad.content = "[1]".into();
        bad.finish_reason = Some(FinishReason::Stop);
        response.alternatives.push(bad);
        assert!(matches!(
            plan.finish(response),
            Err(Error::OutputInvalid { .. })
        ));
    }

    #[test]
    fn a_keyword_the_engine_cannot_enforce_is_refused_before_generation() {
        let request = InferenceRequest::new(vec![ChatMessage::user("x")]).with_json_schema(
            "n",
            json!({"type": "object", "properties": {"x": {"type": "number", "maximum": 1.5}}}),
        );
        match Plan::new(&request, &LLAMA) {
            Err(Error::InvalidRequest { field, reason }) => {
                assert_eq!(field, "response_format.json_schema.schema");
                assert!(reason.contains("maximum"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        let tool = Tool::function(
            "f",
            json!({"type": "object", "properties": {"x": {"type": "string", "pattern": "a+"}}}),
        );
        let request = InferenceRequest::new(vec![ChatMessage::user("x")])
            .with_tool(tool)
            .with_tool_choice(ToolChoice::Required);
        assert!(matches!(
            Plan::new(&request, &LLAMA),
            Err(Error::InvalidRequest { field, .. }) if field == "tools[0].function.parameters"
        ));
    }

    #[test]
    fn tool_choice_none_tells_the_engine_of_no_tool_and_refuses_a_call() {
        let plan = Plan::new(&asking().with_tool_choice(ToolChoice::None), &LLAMA).unwrap();
        assert!(plan.engine_request().tools.is_empty());
        let mut response = answered("");
        response
            .tool_calls
            .push(ToolCall::new("c", "weather", "{}"));
        assert!(matches!(
            plan.finish(response),
            Err(Error::OutputInvalid { .. })
        ));
        assert!(plan.finish(answered("It is sunny.")).is_ok());
    }

    #[test]
    fn auto_on_an_engine_without_a_parser_reads_tagged_calls_here() {
        let plan = Plan::new(&asking(), &PLAIN).unwrap();
        assert!(plan.engine_request().tools.is_empty());
        assert!(sent(&plan).first().unwrap().content.contains("<tool_call>"));
        let response = plan
            .finish(answered(
                "Let me look.\n<tool_call>\n{\"name\": \"weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
            ))
            .unwrap();
        assert_eq!(response.content, "Let me look.");
        assert_eq!(response.tool_calls[0].name, "weather");
        assert_eq!(response.finish_reason, Some(FinishReason::ToolCalls));
        let text = plan.finish(answered("It is sunny.")).unwrap();
        assert!(text.tool_calls.is_empty());
        assert_eq!(text.finish_reason, Some(FinishReason::Stop));
    }

    #[tokio::test]
    async fn a_streamed_call_assembles_to_exactly_the_whole_one() {
        let request = asking()
            .with_tool_choice(ToolChoice::Required)
            .with_parallel_tool_calls(false);
        let text = r#"{"name": "weather", "arguments": {"city": "Paris", "days": 3}}"#;
        let whole = Plan::new(&request, &LLAMA)
            .unwrap()
            .finish(answered(text))
            .unwrap();
        let pieces: Vec<String> = text.chars().map(String::from).collect();
        let pieces: Vec<&str> = pieces.iter().map(String::as_str).collect();
        let plan = Plan::new(&request, &LLAMA).unwrap();
        let streamed = collect_events(plan.events(stream(&pieces, FinishReason::Stop)))
            .await
            .unwrap();
        assert_eq!(streamed.content, "");
        assert_eq!(streamed.finish_reason, Some(FinishReason::ToolCalls));
        assert_eq!(streamed.tool_calls.len(), 1);
        assert_eq!(streamed.tool_calls[0].name, whole.tool_calls[0].name);
        assert_eq!(
            streamed.tool_calls[0].arguments,
            whole.tool_calls[0].arguments
        );
    }

    #[tokio::test]
    async fn a_streamed_answer_that_breaks_its_schema_ends_in_the_typed_error() {
        let request = InferenceRequest::new(vec![ChatMessage::user("x")])
            .with_json_schema("n", json!({"type": "object", "required": ["n"]}));
        let plan = Plan::new(&request, &LLAMA).unwrap();
        let err = collect_events(plan.events(stream(&["{\"m\"", ":1}"], FinishReason::Stop)))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::OutputInvalid { .. }), "{err:?}");
        let plan = Plan::new(&request, &LLAMA).unwrap();
        assert!(
            collect_events(plan.events(stream(&["{\"n\"", ":1}"], FinishReason::Stop)))
                .await
                .is_ok()
        );
    }
}
