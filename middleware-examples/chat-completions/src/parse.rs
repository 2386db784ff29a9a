//! Model text split into reasoning, content and tool calls, as it streams or whole.
//!
//! The splits undo what a Qwen3-style template writes around each part, so that rendering
//! the returned message again gives back the model's bytes: `<think>\n` + reasoning +
//! `\n</think>\n\n` + content, and one `\n` between content and each
//! `<tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>`. A tool call's `arguments`
//! are the exact JSON text the model wrote (not re-serialised), for the same reason.
//!
//! Text that may be the start of a marker is held back until the next piece settles it, so
//! streamed deltas never show half a `<tool_call>`.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::config::{Config, ToolFormat};

const THINK_OPEN: &str = "<think>";
const THINK_CLOSE: &str = "</think>";
const TOOL_OPEN: &str = "<tool_call>";
const TOOL_CLOSE: &str = "</tool_call>";

/// A tool call the model made.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ToolCall {
    pub name: String,
    /// The arguments object exactly as the model wrote it.
    pub arguments: String,
}

/// One piece of parsed output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Delta {
    Reasoning(String),
    Content(String),
    ToolCall(ToolCall),
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
enum Mode {
    /// Nothing seen yet: a `<think>` may open.
    #[default]
    Start,
    /// Inside `<think>`; `fresh` until the first reasoning byte (leading `\n`s are dropped).
    Reasoning {
        fresh: bool,
    },
    /// After `</think>`: leading `\n`s are dropped.
    AfterThink,
    Content,
    /// Inside `<tool_call>`, waiting for its end.
    Tool,
    /// After a tool call: whitespace is dropped, another may open.
    AfterTool,
}

/// The parser's state between pieces (kept in the request's stash while streaming).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Parser {
    mode: Mode,
    /// Text not yet turned into deltas.
    held: String,
    tools: bool,
    reasoning: bool,
}

impl Parser {
    /// `tools`: the request offered tools (and the format parses them). `in_reasoning`: the
    /// prompt already opened `<think>` (templates that start the generation inside it).
    pub fn new(config: &Config, tools: bool, in_reasoning: bool) -> Self {
        let reasoning = config.reasoning;
        Parser {
            mode: if reasoning && in_reasoning {
                Mode::Reasoning { fresh: true }
            } else {
                Mode::Start
            },
            held: String::new(),
            tools: tools && config.tool_format == ToolFormat::Hermes,
            reasoning,
        }
    }

    /// Adds model text; appends the deltas it settles.
    pub fn push(&mut self, text: &str, out: &mut Vec<Delta>) {
        self.held.push_str(text);
        while self.step(false, out) {}
    }

    /// The output ended: everything held back is settled as it stands.
    pub fn finish(&mut self, out: &mut Vec<Delta>) {
        while self.step(true, out) {}
        let rest = std::mem::take(&mut self.held);
        let rest = match self.mode {
            Mode::Tool => format!("{TOOL_OPEN}{rest}"),
            Mode::AfterTool if rest.trim().is_empty() => String::new(),
            _ => rest,
        };
        if !rest.is_empty() {
            match self.mode {
                Mode::Reasoning { .. } => out.push(Delta::Reasoning(rest)),
                _ => out.push(Delta::Content(rest)),
            }
        }
    }

    /// One transition; false when it needs more text (or, with `end`, has nothing to do).
    fn step(&mut self, end: bool, out: &mut Vec<Delta>) -> bool {
        match self.mode {
            Mode::Start => self.start(end),
            Mode::Reasoning { fresh } => self.reasoning(fresh, end, out),
            Mode::AfterThink => {
                let kept = self.held.trim_start_matches('\n').len();
                self.held.drain(..self.held.len() - kept);
                if self.held.is_empty() {
                    return false;
                }
                self.mode = Mode::Content;
                true
            }
            Mode::Content => self.content(end, out),
            Mode::Tool => self.tool(out),
            Mode::AfterTool => {
                let kept = self.held.trim_start().len();
                self.held.drain(..self.held.len() - kept);
                if self.held.starts_with(TOOL_OPEN) {
                    self.held.drain(..TOOL_OPEN.len());
                    self.mode = Mode::Tool;
                    return true;
                }
                if self.held.is_empty() || (!end && TOOL_OPEN.starts_with(&*self.held)) {
                    return false;
                }
                self.mode = Mode::Content;
                true
            }
        }
    }

    fn start(&mut self, end: bool) -> bool {
        if self.reasoning && self.held.starts_with(THINK_OPEN) {
            self.held.drain(..THINK_OPEN.len());
            self.mode = Mode::Reasoning { fresh: true };
            return true;
        }
        let undecided = self.reasoning && THINK_OPEN.starts_with(&*self.held);
        if !end && undecided {
            return false;
        }
        self.mode = Mode::Content;
        true
    }

    fn reasoning(&mut self, fresh: bool, end: bool, out: &mut Vec<Delta>) -> bool {
        if fresh {
            let kept = self.held.trim_start_matches('\n').len();
            self.held.drain(..self.held.len() - kept);
            if self.held.is_empty() {
                return false;
            }
            self.mode = Mode::Reasoning { fresh: false };
        }
        if let Some(at) = self.held.find(THINK_CLOSE) {
            let reasoning = self.held[..at].trim_end_matches('\n').to_owned();
            self.held.drain(..at + THINK_CLOSE.len());
            emit(out, Delta::Reasoning(reasoning));
            self.mode = Mode::AfterThink;
            return true;
        }
        if !end {
            // Trailing `\n`s may be the ones before `</think>`, which the split drops.
            let safe = settled_len(&self.held, THINK_CLOSE);
            let safe = self.held[..safe].trim_end_matches('\n').len();
            let settled: String = self.held.drain(..safe).collect();
            emit(out, Delta::Reasoning(settled));
        }
        false
    }

    fn content(&mut self, end: bool, out: &mut Vec<Delta>) -> bool {
        if !self.tools {
            let all = std::mem::take(&mut self.held);
            emit(out, Delta::Content(all));
            return false;
        }
        if let Some(at) = self.held.find(TOOL_OPEN) {
            let before = &self.held[..at];
            let before = before.strip_suffix('\n').unwrap_or(before).to_owned();
            self.held.drain(..at + TOOL_OPEN.len());
            emit(out, Delta::Content(before));
            self.mode = Mode::Tool;
            return true;
        }
        if !end {
            // One trailing `\n` may be the separator before a tool call.
            let safe = settled_len(&self.held, TOOL_OPEN);
            let safe = self.held[..safe].strip_suffix('\n').map_or(safe, str::len);
            let settled: String = self.held.drain(..safe).collect();
            emit(out, Delta::Content(settled));
        }
        false
    }

    fn tool(&mut self, out: &mut Vec<Delta>) -> bool {
        let Some(at) = self.held.find(TOOL_CLOSE) else {
            return false;
        };
        let body: String = self.held.drain(..at).collect();
        self.held.drain(..TOOL_CLOSE.len());
        match tool_call(&body) {
            Some(call) => out.push(Delta::ToolCall(call)),
            // Not a call we can read: the model's text stays visible as content.
            None => out.push(Delta::Content(format!("{TOOL_OPEN}{body}{TOOL_CLOSE}"))),
        }
        self.mode = Mode::AfterTool;
        true
    }
}

/// Bytes of `text` that cannot be the start of `marker`: all but the longest suffix that is
/// a proper prefix of it. Markers are ASCII, so the cut is a char boundary.
fn settled_len(text: &str, marker: &str) -> usize {
    let longest = (1..marker.len())
        .rev()
        .find(|&k| text.ends_with(&marker[..k]))
        .unwrap_or(0);
    text.len() - longest
}

fn emit(out: &mut Vec<Delta>, delta: Delta) {
    let empty = matches!(&delta, Delta::Reasoning(s) | Delta::Content(s) if s.is_empty());
    if !empty {
        out.push(delta);
    }
}

/// `{"name": ..., "arguments": {...}}` between the markers.
fn tool_call(body: &str) -> Option<ToolCall> {
    #[derive(Deserialize)]
    struct Call<'a> {
        name: String,
        #[serde(borrow)]
        arguments: Option<&'a RawValue>,
    }
    let call: Call<'_> = serde_json::from_str(body.trim()).ok()?;
    Some(ToolCall {
        name: call.name,
        arguments: call
            .arguments
            .map_or_else(|| "{}".to_owned(), |a| a.get().to_owned()),
    })
}

/// A whole output, parsed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    /// `Some` when the model reasoned (even emptily).
    pub reasoning: Option<String>,
    pub content: String,
    pub tool_calls: Vec<ToolCall>,
}

impl Parsed {
    /// Parses `text` as the stream parser would, in one piece.
    pub fn of(mut parser: Parser, text: &str) -> Self {
        let opened = matches!(parser.mode, Mode::Reasoning { .. });
        let mut deltas = Vec::new();
        parser.push(text, &mut deltas);
        parser.finish(&mut deltas);
        let mut parsed = Parsed::default();
        let reasoned = opened || (parser.reasoning && text.starts_with(THINK_OPEN));
        for delta in deltas {
            match delta {
                Delta::Reasoning(r) => parsed.reasoning.get_or_insert_default().push_str(&r),
                Delta::Content(c) => parsed.content.push_str(&c),
                Delta::ToolCall(call) => parsed.tool_calls.push(call),
            }
        }
        if reasoned {
            parsed.reasoning.get_or_insert_default();
        }
        parsed
    }
}

#[cfg(test)]
mod tests;
