//! Tools written into the conversation as text, for engines and templates
//! that do not render them: the note that tells the model which tools
//! exist and how to call them, and earlier calls and results lowered to
//! plain messages.

use serde_json::json;

use runtime_core::{ChatMessage, Role, Tool, ToolCall};

/// How the model is told to write a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CallStyle {
    /// The whole answer is the call as JSON (its shape is enforced by a
    /// schema constraint); with `parallel`, an array of calls.
    Json { parallel: bool },
    /// Calls are `<tool_call>{...}</tool_call>` blocks amid free text
    /// (Hermes), read by the engine's tool parser or ours.
    Tagged,
}

/// The system note that lists `tools` and says how to call them.
pub(crate) fn tools_note(tools: &[&Tool], style: CallStyle) -> String {
    let mut note =
        String::from("You can call these tools (JSON Schema of each one's arguments):\n");
    for tool in tools {
        let mut entry = json!({"name": tool.name, "parameters": tool.parameters_schema()});
        if let Some(description) = &tool.description {
            entry["description"] = description.clone().into();
        }
        note.push_str(&entry.to_string());
        note.push('\n');
    }
    note.push_str(match style {
        CallStyle::Json { parallel: false } => {
            "Answer with one call as JSON: {\"name\": <the tool's name>, \"arguments\": <its arguments>}."
        }
        CallStyle::Json { parallel: true } => {
            "Answer with the calls as a JSON array of one or more \
             {\"name\": <the tool's name>, \"arguments\": <its arguments>}, \
             each call once."
        }
        CallStyle::Tagged => {
            "To call a tool, answer with <tool_call>{\"name\": <the tool's name>, \
             \"arguments\": <its arguments>}</tool_call>; otherwise answer normally."
        }
    });
    note
}

/// `messages` with `note` added to the system message, or a system
/// message of it first when there is none.
pub(crate) fn with_note(mut messages: Vec<ChatMessage>, note: &str) -> Vec<ChatMessage> {
    match messages.first_mut() {
        Some(first) if first.role == Role::System => {
            if !first.content.is_empty() {
                first.content.push_str("\n\n");
            }
            first.content.push_str(note);
        }
        _ => messages.insert(0, ChatMessage::system(note)),
    }
    messages
}

/// `messages` with earlier calls and their results as plain text, for a
/// template that would drop them: an assistant's calls become its content,
/// written as `style` says, and each tool result a user message.
pub(crate) fn lowered(messages: &[ChatMessage], style: CallStyle) -> Vec<ChatMessage> {
    messages
        .iter()
        .map(|message| {
            if message.role == Role::Tool {
                let id = message.tool_call_id.as_deref().unwrap_or_default();
                return ChatMessage::user(format!(
                    "<tool_response id=\"{id}\">\n{}\n</tool_response>",
                    message.content
                ));
            }
            if message.tool_calls.is_empty() {
                return message.clone();
            }
            let mut content = message.content.clone();
            if !content.is_empty() {
                content.push('\n');
            }
            content.push_str(&calls_text(&message.tool_calls, style));
            ChatMessage::new(message.role.clone(), content)
        })
        .collect()
}

/// Calls written the way the model was told to write them.
fn calls_text(calls: &[ToolCall], style: CallStyle) -> String {
    let one = |call: &ToolCall| {
        // Arguments that are not JSON (an earlier engine's mistake) are
        // kept as the string they were.
        let arguments = call
            .arguments_json()
            .unwrap_or_else(|_| call.arguments.clone().into());
        json!({"name": call.name, "arguments": arguments})
    };
    match style {
        CallStyle::Json { parallel: true } => {
            serde_json::Value::Array(calls.iter().map(one).collect()).to_string()
        }
        CallStyle::Json { parallel: false } => calls
            .iter()
            .map(|call| one(call).to_string())
            .collect::<Vec<_>>()
            .join("\n"),
        CallStyle::Tagged => calls
            .iter()
            .map(|call| format!("<tool_call>\n{}\n</tool_call>", one(call)))
            .collect::<Vec<_>>()
            .join("\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Tool {
        Tool::function(
            "weather",
            json!({"type": "object", "properties": {"city": {"type": "string"}}}),
        )
        .with_description("Weather by city")
    }

    #[test]
    fn the_note_joins_an_existing_system_message_or_comes_first() {
        let tool = weather();
        let note = tools_note(&[&tool], CallStyle::Json { parallel: false });
        assert!(note.contains(r#""name":"weather""#) && note.contains("Weather by city"));
        let joined = with_note(
            vec![ChatMessage::system("Be brief."), ChatMessage::user("hi")],
            &note,
        );
        assert_eq!(joined.len(), 2);
        assert!(joined[0].content.starts_with("Be brief.\n\nYou can call"));
        let first = with_note(vec![ChatMessage::user("hi")], &note);
        assert_eq!(first[0].role, Role::System);
        assert_eq!(first[1].content, "hi");
    }

    #[test]
    fn earlier_calls_and_results_become_plain_messages() {
        let history = vec![
            ChatMessage::user("weather in Paris?"),
            ChatMessage::assistant_calls(vec![ToolCall::new(
                "call_1",
                "weather",
                r#"{"city":"Paris"}"#,
            )]),
            ChatMessage::tool_result("call_1", "sunny"),
        ];
        let tagged = lowered(&history, CallStyle::Tagged);
        assert_eq!(tagged[0], history[0]);
        assert_eq!(tagged[1].role, Role::Assistant);
        assert!(tagged[1].tool_calls.is_empty());
        assert_eq!(
            tagged[1].content,
            format!(
                "<tool_call>\n{}\n</tool_call>",
                json!({"name": "weather", "arguments": {"city": "Paris"}})
            )
        );
        assert_eq!(tagged[2].role, Role::User);
        assert_eq!(
            tagged[2].content,
            "<tool_response id=\"call_1\">\nsunny\n</tool_response>"
        );
        let json = lowered(&history, CallStyle::Json { parallel: true });
        let calls: serde_json::Value = serde_json::from_str(&json[1].content).unwrap();
        assert_eq!(calls[0]["arguments"]["city"], "Paris");
    }
}
