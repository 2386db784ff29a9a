//! The chat template of a Hugging Face model directory, for the `tokenizer.chat-template`
//! import: the router only reads it, the chat middleware renders it.

use std::path::Path;

use anyhow::{Context as _, bail};
use serde_json::Value;

/// A template and the special tokens templates refer to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTemplate {
    /// Jinja source.
    pub source: String,
    /// `bos_token` of tokenizer_config.json.
    pub bos_token: Option<String>,
    /// `eos_token` of tokenizer_config.json.
    pub eos_token: Option<String>,
}

impl ChatTemplate {
    /// The template of model directory `dir`: `chat_template.jinja` when present (newer
    /// checkpoints keep it there), else tokenizer_config.json's `chat_template`. `Ok(None)`
    /// when the directory has neither, since a router without the chat middleware needs none.
    pub fn load(dir: &Path) -> anyhow::Result<Option<Self>> {
        let config_file = dir.join("tokenizer_config.json");
        let config = match std::fs::read(&config_file) {
            Ok(bytes) => serde_json::from_slice::<Value>(&bytes)
                .with_context(|| format!("{} is not JSON", config_file.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Value::Null,
            Err(e) => {
                return Err(e).with_context(|| format!("cannot read {}", config_file.display()));
            }
        };
        let jinja_file = dir.join("chat_template.jinja");
        let source = match std::fs::read_to_string(&jinja_file) {
            Ok(source) => Some(source),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                template_in(&config).with_context(|| config_file.display().to_string())?
            }
            Err(e) => {
                return Err(e).with_context(|| format!("cannot read {}", jinja_file.display()));
            }
        };
        Ok(source.map(|source| ChatTemplate {
            source,
            bos_token: token(&config, "bos_token"),
            eos_token: token(&config, "eos_token"),
        }))
    }
}

/// `chat_template` as a string, or as a list of `{name, template}` (take `default`).
fn template_in(config: &Value) -> anyhow::Result<Option<String>> {
    match config.get("chat_template") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(source)) => Ok(Some(source.clone())),
        Some(Value::Array(named)) => {
            let named = |name: &str| {
                named
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some(name))
            };
            match named("default").and_then(|t| t.get("template")?.as_str()) {
                Some(source) => Ok(Some(source.to_owned())),
                None => bail!("chat_template lists templates but none is named `default`"),
            }
        }
        Some(_) => bail!("chat_template must be a string or a list of {{name, template}}"),
    }
}

/// A special token given as its text or as an added-token object (`{"content": ...}`).
fn token(config: &Value, key: &str) -> Option<String> {
    match config.get(key)? {
        Value::String(text) => Some(text.clone()),
        Value::Object(added) => added.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_string_and_named_templates_and_added_tokens() {
        let plain = json!({"chat_template": "{{ x }}", "eos_token": "<e>",
                           "bos_token": {"content": "<b>", "special": true}});
        assert_eq!(
            template_in(&plain).ok().flatten().as_deref(),
            Some("{{ x }}")
        );
        assert_eq!(token(&plain, "eos_token").as_deref(), Some("<e>"));
        assert_eq!(token(&plain, "bos_token").as_deref(), Some("<b>"));
        let named = json!({"chat_template": [{"name": "tool_use", "template": "t"},
                                             {"name": "default", "template": "d"}]});
        assert_eq!(template_in(&named).ok().flatten().as_deref(), Some("d"));
        assert!(template_in(&json!({"chat_template": [{"name": "x", "template": "t"}]})).is_err());
        assert_eq!(template_in(&json!({})).ok().flatten(), None);
    }
}
