use super::*;

fn parser(tools: bool) -> Parser {
    Parser::new(&Config::default(), tools, false)
}

fn whole(text: &str) -> Parsed {
    Parsed::of(parser(true), text)
}

/// Deltas of `text` fed in pieces of `size` bytes (on char boundaries), joined by kind.
fn streamed(text: &str, size: usize) -> Parsed {
    let mut p = parser(true);
    let mut deltas = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let mut cut = size.min(rest.len());
        while !rest.is_char_boundary(cut) {
            cut += 1;
        }
        p.push(&rest[..cut], &mut deltas);
        rest = &rest[cut..];
    }
    p.finish(&mut deltas);
    let mut out = Parsed::default();
    for d in deltas {
        match d {
            Delta::Reasoning(r) => out.reasoning.get_or_insert_default().push_str(&r),
            Delta::Content(c) => out.content.push_str(&c),
            Delta::ToolCall(c) => out.tool_calls.push(c),
        }
    }
    out
}

#[test]
fn splits_reasoning_content_and_tool_calls() {
    let text = "<think>\nLet me look.\n</think>\n\nChecking.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"b\", \"arguments\": {}}\n</tool_call>";
    let p = whole(text);
    assert_eq!(p.reasoning.as_deref(), Some("Let me look."));
    assert_eq!(p.content, "Checking.");
    assert_eq!(
        p.tool_calls,
        vec![
            ToolCall {
                name: "get_weather".into(),
                arguments: "{\"city\": \"Paris\"}".into()
            },
            ToolCall {
                name: "b".into(),
                arguments: "{}".into()
            }
        ]
    );
    for size in [1, 2, 3, 5, 7, 11, 64] {
        assert_eq!(streamed(text, size), p, "pieces of {size}");
    }
}

#[test]
fn plain_text_stays_content_whatever_the_pieces() {
    for text in [
        "Hello <b>world</b> and <thin ice",
        "ends with a newline\n",
        "a < b\n\nc",
        "東京は <tool 日本",
        "",
    ] {
        let p = whole(text);
        assert_eq!((p.reasoning, p.content.as_str()), (None, text));
        for size in [1, 2, 4] {
            assert_eq!(
                streamed(text, size).content,
                text,
                "{text:?} in pieces of {size}"
            );
        }
    }
}

#[test]
fn without_tools_a_tool_call_is_content() {
    let text = "<tool_call>\n{\"name\": \"x\"}\n</tool_call>";
    let p = Parsed::of(parser(false), text);
    assert_eq!(p.content, text);
    assert!(p.tool_calls.is_empty());
}

#[test]
fn a_broken_or_unfinished_call_stays_visible() {
    let p = whole("<tool_call>\nnot json\n</tool_call>");
    assert_eq!(p.content, "<tool_call>\nnot json\n</tool_call>");
    let p = whole("Sure.\n<tool_call>\n{\"name\": \"x\", \"argu");
    assert_eq!(p.content, "Sure.<tool_call>\n{\"name\": \"x\", \"argu");
}

#[test]
fn unfinished_reasoning_and_a_prompt_that_opened_it() {
    let p = whole("<think>\nstill thinking");
    assert_eq!(
        (p.reasoning.as_deref(), p.content.as_str()),
        (Some("still thinking"), "")
    );
    let opened = Parser::new(&Config::default(), false, true);
    let p = Parsed::of(opened, "hmm\n</think>\n\nDone.");
    assert_eq!(
        (p.reasoning.as_deref(), p.content.as_str()),
        (Some("hmm"), "Done.")
    );
    let off = Config {
        reasoning: false,
        ..Config::default()
    };
    let p = Parsed::of(Parser::new(&off, false, false), "<think>x</think>y");
    assert_eq!(
        (p.reasoning, p.content.as_str()),
        (None, "<think>x</think>y")
    );
}
