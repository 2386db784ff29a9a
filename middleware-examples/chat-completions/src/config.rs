//! The middleware's config string, e.g. `tool_format=hermes&reasoning=think`.

/// How the model writes tool calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ToolFormat {
    /// Hermes and Qwen: `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`.
    #[default]
    Hermes,
    /// Never parse tool calls: the text stays content.
    None,
}

/// What the middleware was configured with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    pub tool_format: ToolFormat,
    /// Split `<think>...</think>` into `reasoning_content`.
    pub reasoning: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            tool_format: ToolFormat::Hermes,
            reasoning: true,
        }
    }
}

/// Parses `key=value` pairs joined by `&`; both keys are optional.
///
/// - `tool_format`: `hermes` (default) or `none`. Formats are per model family; each new one
///   is a variant of [`ToolFormat`] and its markers in [`crate::parse`].
/// - `reasoning`: `think` (default) splits `<think>` blocks out, `none` leaves them in content.
pub fn parse(config: &str) -> Result<Config, String> {
    let mut out = Config::default();
    for pair in config.trim().split('&').filter(|p| !p.is_empty()) {
        let Some((key, value)) = pair.split_once('=') else {
            return Err(format!(
                "chat-completions: config `{pair}` is not key=value"
            ));
        };
        match (key, value) {
            ("tool_format", "hermes") => out.tool_format = ToolFormat::Hermes,
            ("tool_format", "none") => out.tool_format = ToolFormat::None,
            ("reasoning", "think") => out.reasoning = true,
            ("reasoning", "none") => out.reasoning = false,
            ("tool_format" | "reasoning", v) => {
                return Err(format!(
                    "chat-completions: `{key}` cannot be `{v}` (tool_format: hermes|none, reasoning: think|none)"
                ));
            }
            (other, _) => {
                return Err(format!(
                    "chat-completions: unknown config key `{other}` (known: tool_format, reasoning)"
                ));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        assert_eq!(parse(""), Ok(Config::default()));
        let c = parse("tool_format=none&reasoning=none").expect("valid");
        assert_eq!((c.tool_format, c.reasoning), (ToolFormat::None, false));
        for bad in ["tool_format=json", "x=1", "reasoning"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
