//! What a chat template does with tools, read from its source.

/// Whether a Jinja chat template renders tools itself: it reads the
/// `tools` variable the chat API hands it. A template that never reads it
/// would drop the tool list, so the tools go into the conversation as
/// text instead. A template that does not parse renders nothing at all,
/// and is reported as not rendering tools.
pub fn renders_tools(source: &str) -> bool {
    let env = minijinja::Environment::new();
    match env.template_from_str(source) {
        Ok(template) => template.undeclared_variables(false).contains("tools"),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_template_that_reads_tools_renders_them_and_one_that_does_not_does_not() {
        let hermes = "{%- if tools %}<tools>{% for tool in tools %}{{ tool | tojson }}{% endfor %}</tools>{% endif %}\
                      {% for message in messages %}{{ message.content }}{% endfor %}";
        assert!(renders_tools(hermes));
        let plain = "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}";
        assert!(!renders_tools(plain));
        // A loop variable named like it is not the chat API's `tools`.
        let shadowed =
            "{% set tools = [] %}{% for message in messages %}{{ message.content }}{% endfor %}";
        assert!(!renders_tools(shadowed));
        assert!(!renders_tools("{% for %}"));
    }
}
