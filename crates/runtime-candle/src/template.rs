//! The model's own chat template, rendered with minijinja.

use minijinja::{Environment, ErrorKind, context};
use runtime_core::{ChatMessage, Error, Result};
use serde::Serialize;

const TEMPLATE_NAME: &str = "chat";

/// A compiled chat template.
#[derive(Debug)]
pub(crate) struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

#[derive(Debug, Serialize)]
struct Message<'a> {
    role: &'a str,
    content: &'a str,
}

impl ChatTemplate {
    /// Compiles `source` (Jinja, as in `tokenizer.chat_template`).
    pub(crate) fn new(source: String, bos_token: String, eos_token: String) -> Result<Self> {
        let mut env = Environment::new();
        // Templates written for Python's Jinja call str methods such as .strip().
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_template_owned(TEMPLATE_NAME, source)
            .map_err(|err| Error::engine("the model's chat template does not compile", err))?;
        Ok(Self {
            env,
            bos_token,
            eos_token,
        })
    }

    /// The prompt for `messages`, ending with the assistant's turn opened;
    /// a trailing assistant message is continued instead (a prefill): the
    /// conversation before it with the turn opened, then its text, as
    /// llama-server builds it.
    pub(crate) fn render(&self, messages: &[ChatMessage]) -> Result<String> {
        match messages.split_last() {
            Some((last, before)) if last.is_continuable() => {
                Ok(self.render_opened(before)? + &last.content)
            }
            _ => self.render_opened(messages),
        }
    }

    fn render_opened(&self, messages: &[ChatMessage]) -> Result<String> {
        let messages: Vec<Message<'_>> = messages
            .iter()
            .map(|m| Message {
                role: m.role.as_str(),
                content: &m.content,
            })
            .collect();
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|err| Error::engine("the chat template is missing", err))?;
        template
            .render(context! {
                messages => minijinja::Value::from_serialize(&messages),
                add_generation_prompt => true,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
            })
            .map_err(|err| match err.kind() {
                // The template itself refused the conversation (raise_exception).
                ErrorKind::InvalidOperation => Error::invalid_request("messages", err.to_string()),
                _ => Error::engine("error rendering the chat template", err),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2's template, as its GGUF carries it.
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn smollm2_template_adds_its_default_system_prompt() {
        let template =
            ChatTemplate::new(SMOLLM2.into(), String::new(), "<|im_end|>".into()).unwrap();
        let prompt = template.render(&[ChatMessage::user("Hi")]).unwrap();
        assert_eq!(
            prompt,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let own = template
            .render(&[ChatMessage::system("Be brief."), ChatMessage::user("Hi")])
            .unwrap();
        assert!(own.starts_with("<|im_start|>system\nBe brief.<|im_end|>"));
    }

    #[test]
    fn a_trailing_assistant_message_is_continued_in_its_opened_turn() {
        let template = ChatTemplate::new(SMOLLM2.to_owned(), String::new(), String::new()).unwrap();
        let user = ChatMessage::user("Count to ten.");
        let opened = template.render(std::slice::from_ref(&user)).unwrap();
        let continued = template
            .render(&[user, ChatMessage::assistant("1, 2, 3,")])
            .unwrap();
        assert_eq!(continued, format!("{opened}1, 2, 3,"));
        assert!(opened.ends_with("<|im_start|>assistant\n"), "{opened:?}");
    }

    #[test]
    fn python_string_methods_work_in_templates() {
        let template = ChatTemplate::new(
            "{% for m in messages %}{{ m.content.strip().upper() }}{% endfor %}".into(),
            String::new(),
            String::new(),
        )
        .unwrap();
        assert_eq!(
            template.render(&[ChatMessage::user("  hi ")]).unwrap(),
            "HI"
        );
    }

    #[test]
    fn a_template_that_raises_is_an_invalid_request() {
        let template = ChatTemplate::new(
            "{{ raise_exception('roles must alternate') }}".into(),
            String::new(),
            String::new(),
        )
        .unwrap();
        let err = template.render(&[ChatMessage::user("x")]).unwrap_err();
        assert!(
            matches!(&err, Error::InvalidRequest { field, .. } if field == "messages"),
            "{err:?}"
        );
    }
}
