//! `--chat`: replies that follow from the conversation in a ChatML prompt, so that chat
//! completions can be tested without a model. The prompt is decoded, its last message read,
//! and the reply picked by what that message asks; it ends with `<|im_end|>`, the EOS.

/// ChatML's message markers, as the test templates write them.
const START: &str = "<|im_start|>";
const END: &str = "<|im_end|>";

/// The model text for `prompt` (decoded with its special tokens), without the EOS.
pub fn reply(prompt: &str) -> String {
    let turn = prompt.matches("<|im_start|>user").count();
    let (role, content) = last_message(prompt).unwrap_or(("", ""));
    if let Some(result) = content.strip_prefix("<tool_response>") {
        let result = result
            .trim_end()
            .trim_end_matches("</tool_response>")
            .trim();
        return format!("The tool says: {result}");
    }
    if role == "user" && content.contains("weather") && prompt.contains("<tools>") {
        return "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>".into();
    }
    if content.contains("think") {
        return format!(
            "<think>\nTurn {turn} asks me to think.\n</think>\n\nI thought about turn {turn}."
        );
    }
    let quoted: String = content.chars().take(24).collect();
    format!("Reply {turn}: you said {quoted}")
}

/// Role and content of the last whole message before the generation prompt.
fn last_message(prompt: &str) -> Option<(&str, &str)> {
    let body = &prompt[..prompt.rfind(END)?];
    let block = &body[body.rfind(START)? + START.len()..];
    Some(block.split_once('\n').unwrap_or((block, "")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_follow_the_last_message() {
        let p = "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n";
        assert_eq!(reply(p), "Reply 1: you said hello there");
        let p = "<|im_start|>system\n<tools>[]</tools><|im_end|>\n<|im_start|>user\nweather?<|im_end|>\n<|im_start|>assistant\n";
        assert!(reply(p).starts_with("<tool_call>\n{\"name\": \"get_weather\""));
        let p = "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n<|im_start|>assistant\n";
        assert_eq!(reply(p), "The tool says: sunny");
        let p = "<|im_start|>user\nthink hard<|im_end|>\n<|im_start|>assistant\n";
        assert!(reply(p).starts_with("<think>\nTurn 1"));
    }
}
