//! The chat template, rendered as Hugging Face's `apply_chat_template` does: Jinja with
//! `trim_blocks` and `lstrip_blocks`, Python's string methods, `raise_exception`, and a
//! `tojson` that writes what Python's `json.dumps` writes.

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, Serde, Value};
use minijinja::{Environment, Error, ErrorKind};
use serde_json::Value as Json;

const NAME: &str = "chat_template";

/// A compiled template with the special tokens it may use.
pub struct Renderer {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

/// What one rendering needs besides the template.
pub struct Chat<'a> {
    pub messages: &'a [Json],
    pub tools: Option<&'a [Json]>,
    pub add_generation_prompt: bool,
    /// Extra template variables (`chat_template_kwargs`, e.g. `enable_thinking`).
    pub kwargs: Option<&'a serde_json::Map<String, Json>>,
}

impl Renderer {
    /// Compiles `source`; the error says where it does not parse.
    pub fn new(
        source: &str,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, String> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| format!("chat template syntax: {e}"))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source.to_owned())
            .map_err(|e| format!("chat template does not compile: {e:#}"))?;
        Ok(Renderer {
            env,
            bos_token,
            eos_token,
        })
    }

    /// The prompt text of `chat`.
    pub fn render(&self, chat: &Chat<'_>) -> Result<String, String> {
        let mut context = serde_json::Map::new();
        if let Some(kwargs) = chat.kwargs {
            context.extend(kwargs.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        context.insert("messages".into(), Json::from(chat.messages.to_vec()));
        if let Some(tools) = chat.tools {
            context.insert("tools".into(), Json::from(tools.to_vec()));
        }
        context.insert(
            "add_generation_prompt".into(),
            Json::Bool(chat.add_generation_prompt),
        );
        for (key, token) in [
            ("bos_token", &self.bos_token),
            ("eos_token", &self.eos_token),
        ] {
            if let Some(token) = token {
                context.insert(key.into(), Json::String(token.clone()));
            }
        }
        let template = self
            .env
            .get_template(NAME)
            .map_err(|e| format!("chat template: {e}"))?;
        template
            .render(Value::from(Serde(&context)))
            .map_err(|e| match e.kind() {
                ErrorKind::InvalidOperation => e.detail().unwrap_or("raise_exception").to_owned(),
                _ => format!("{e:#}"),
            })
    }
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// `tojson` as transformers defines it: `json.dumps(x, ensure_ascii=False, indent=indent)`,
/// so `", "` and `": "` between items and no HTML escaping (minijinja's own escapes `<`).
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let _: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = String::new();
    python_json(&json, indent, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

fn python_json(value: &Json, indent: Option<usize>, depth: usize, out: &mut String) {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', n * depth));
        }
    };
    let separator = if indent.is_some() { "," } else { ", " };
    match value {
        Json::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(separator);
                }
                newline(out, depth + 1);
                python_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        Json::Object(fields) if !fields.is_empty() => {
            out.push('{');
            for (i, (key, item)) in fields.iter().enumerate() {
                if i > 0 {
                    out.push_str(separator);
                }
                newline(out, depth + 1);
                out.push_str(&Json::String(key.clone()).to_string());
                out.push_str(": ");
                python_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        // serde_json escapes strings as json.dumps(ensure_ascii=False) does, except that it
        // writes U+007F raw, which Python also does.
        other => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn render(source: &str, messages: Json) -> Result<String, String> {
        let r = Renderer::new(source, Some("<s>".into()), Some("</s>".into()))?;
        let messages = messages.as_array().cloned().unwrap_or_default();
        r.render(&Chat {
            messages: &messages,
            tools: None,
            add_generation_prompt: true,
            kwargs: None,
        })
    }

    #[test]
    fn renders_with_hf_whitespace_rules_and_python_methods() {
        let source = "{{ bos_token }}{% for m in messages %}\n  {% if m.role == 'user' %}\n[{{ m.content.strip() }}]\n  {% endif %}\n{% endfor %}{% if add_generation_prompt %}>{% endif %}";
        let out = render(source, json!([{"role": "user", "content": "  hi  "}]));
        assert_eq!(out.as_deref(), Ok("<s>[hi]\n>"));
    }

    #[test]
    fn tojson_writes_what_python_writes() {
        let out = render(
            "{{ messages[0] | tojson }}|{{ messages[0] | tojson(indent=2) }}",
            json!([{"b": [1, "<x>"], "a": {}, "é": null}]),
        );
        assert_eq!(
            out.as_deref(),
            Ok(
                "{\"b\": [1, \"<x>\"], \"a\": {}, \"é\": null}|{\n  \"b\": [\n    1,\n    \"<x>\"\n  ],\n  \"a\": {},\n  \"é\": null\n}"
            )
        );
    }

    #[test]
    fn raise_exception_and_syntax_errors_are_errors() {
        let out = render("{{ raise_exception('roles must alternate') }}", json!([]));
        assert_eq!(out, Err("roles must alternate".to_owned()));
        assert!(Renderer::new("{% if %}", None, None).is_err());
    }
}
