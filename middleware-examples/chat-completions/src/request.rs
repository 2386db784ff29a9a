//! The OpenAI request: read, checked, and written out as SGLang's `/generate` body.

use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::render::{Chat, Renderer};

/// A client mistake, answered with 400 in OpenAI's error shape.
#[derive(Debug, PartialEq, Eq)]
pub struct BadRequest {
    pub message: String,
    /// The field at fault, as OpenAI's `error.param`.
    pub param: Option<&'static str>,
}

impl BadRequest {
    fn new(message: impl Into<String>, param: Option<&'static str>) -> Self {
        BadRequest {
            message: message.into(),
            param,
        }
    }

    /// `{"error": {"message", "type", "param", "code"}}`, as OpenAI answers.
    pub fn body(&self) -> Vec<u8> {
        let error = json!({"error": {"message": self.message, "type": "invalid_request_error",
                                     "param": self.param, "code": null}});
        error.to_string().into_bytes()
    }
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The fields read; others (`user`, `metadata`, ...) are accepted and ignored.
#[derive(Deserialize)]
struct ChatRequest {
    #[serde(default)]
    model: Option<String>,
    messages: Option<Vec<Value>>,
    #[serde(default)]
    tools: Option<Vec<Value>>,
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    stop: Option<Value>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    n: Option<u64>,
    /// Template variables, as SGLang and vLLM take them (`enable_thinking`).
    #[serde(default)]
    chat_template_kwargs: Option<Map<String, Value>>,
    /// SGLang's request id, passed on so `/abort_request` can name it.
    #[serde(default)]
    rid: Option<Value>,
}

/// What the response side needs to know about the request.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Meta {
    pub model: String,
    /// Unix seconds when the request came, OpenAI's `created`.
    pub created: u64,
    pub stream: bool,
    pub include_usage: bool,
    /// Tool calls are parsed from the output.
    pub tools: bool,
    /// The prompt ends inside `<think>`: the output starts as reasoning.
    pub in_reasoning: bool,
}

/// A chat request turned into `/generate`.
pub struct Generate {
    pub body: Vec<u8>,
    pub meta: Meta,
}

/// Reads `body`, renders its messages and writes the `/generate` body.
pub fn to_generate(body: &[u8], renderer: &Renderer, created: u64) -> Result<Generate, BadRequest> {
    let request: ChatRequest = serde_json::from_slice(body).map_err(|e| {
        BadRequest::new(format!("body is not a chat completion request: {e}"), None)
    })?;
    if request.n.is_some_and(|n| n != 1) {
        return Err(BadRequest::new("only n=1 is supported", Some("n")));
    }
    let messages = messages(request.messages)?;
    let tools = request.tools.filter(|t| !t.is_empty());
    let tool_choice_none = request.tool_choice.as_ref().and_then(Value::as_str) == Some("none");
    let text = renderer
        .render(&Chat {
            messages: &messages,
            tools: tools.as_deref(),
            add_generation_prompt: true,
            kwargs: request.chat_template_kwargs.as_ref(),
        })
        .map_err(|e| {
            BadRequest::new(
                format!("chat template failed to render: {e}"),
                Some("messages"),
            )
        })?;
    let in_reasoning = text.trim_end_matches('\n').ends_with("<think>");
    let mut sampling = Map::new();
    let max_new = request.max_completion_tokens.or(request.max_tokens);
    let fields = [
        ("max_new_tokens", max_new.map(Value::from)),
        ("temperature", request.temperature.map(Value::from)),
        ("top_p", request.top_p.map(Value::from)),
        ("stop", stop(request.stop)?),
        ("sampling_seed", request.seed.map(Value::from)),
    ];
    sampling.extend(
        fields
            .into_iter()
            .filter_map(|(k, v)| Some((k.to_owned(), v?))),
    );
    let stream = request.stream.unwrap_or(false);
    let mut generate = json!({"text": text, "sampling_params": sampling,
                              "return_logprob": true, "stream": stream});
    if let Some(rid) = request.rid {
        generate["rid"] = rid;
    }
    Ok(Generate {
        body: generate.to_string().into_bytes(),
        meta: Meta {
            model: request.model.unwrap_or_default(),
            created,
            stream,
            include_usage: request.stream_options.is_some_and(|o| o.include_usage),
            tools: tools.is_some() && !tool_choice_none,
            in_reasoning,
        },
    })
}

/// `/retrieve_from_text` with `messages`: the whole conversation, no generation prompt.
/// `None` when the body has no `messages` (a `text` request, for the cache to answer).
pub fn retrieval_text(body: &[u8], renderer: &Renderer) -> Option<Result<String, BadRequest>> {
    #[derive(Deserialize)]
    struct Retrieve {
        messages: Option<Vec<Value>>,
        #[serde(default)]
        tools: Option<Vec<Value>>,
        #[serde(default)]
        chat_template_kwargs: Option<Map<String, Value>>,
    }
    let request: Retrieve = serde_json::from_slice(body).ok()?;
    request.messages.as_ref()?;
    let rendered = messages(request.messages).and_then(|messages| {
        renderer
            .render(&Chat {
                messages: &messages,
                tools: request.tools.as_deref().filter(|t| !t.is_empty()),
                add_generation_prompt: false,
                kwargs: request.chat_template_kwargs.as_ref(),
            })
            .map_err(|e| {
                BadRequest::new(
                    format!("chat template failed to render: {e}"),
                    Some("messages"),
                )
            })
    });
    Some(rendered)
}

const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

/// The messages, checked, with content part lists joined into strings (templates expect
/// strings; only text parts have any).
fn messages(messages: Option<Vec<Value>>) -> Result<Vec<Value>, BadRequest> {
    let messages =
        messages.ok_or_else(|| BadRequest::new("`messages` is required", Some("messages")))?;
    if messages.is_empty() {
        return Err(BadRequest::new("`messages` is empty", Some("messages")));
    }
    messages
        .into_iter()
        .enumerate()
        .map(|(i, message)| checked(i, message))
        .collect()
}

fn checked(i: usize, mut message: Value) -> Result<Value, BadRequest> {
    let bad = |what: String| BadRequest::new(format!("messages[{i}]: {what}"), Some("messages"));
    let Some(fields) = message.as_object_mut() else {
        return Err(bad("must be an object".into()));
    };
    match fields.get("role").and_then(Value::as_str) {
        Some(role) if ROLES.contains(&role) => {}
        Some(role) => {
            return Err(bad(format!(
                "unknown role `{role}` (known: {})",
                ROLES.join(", ")
            )));
        }
        None => return Err(bad("`role` must be a string".into())),
    }
    match fields.get("content") {
        None | Some(Value::Null | Value::String(_)) => {}
        Some(Value::Array(parts)) => {
            let text = joined_text(parts).map_err(bad)?;
            fields.insert("content".into(), Value::String(text));
        }
        Some(_) => {
            return Err(bad(
                "`content` must be a string or a list of text parts".into()
            ));
        }
    }
    Ok(message)
}

fn joined_text(parts: &[Value]) -> Result<String, String> {
    let mut text = String::new();
    for part in parts {
        match (part.get("type").and_then(Value::as_str), part.get("text")) {
            (Some("text"), Some(Value::String(t))) => text.push_str(t),
            (Some(kind), _) => {
                return Err(format!(
                    "content parts of type `{kind}` are not supported (text only)"
                ));
            }
            _ => return Err("a content part needs `type` and `text`".into()),
        }
    }
    Ok(text)
}

fn stop(stop: Option<Value>) -> Result<Option<Value>, BadRequest> {
    match stop {
        None | Some(Value::Null) => Ok(None),
        Some(s @ Value::String(_)) => Ok(Some(s)),
        Some(Value::Array(list)) if list.iter().all(Value::is_string) => {
            Ok(Some(Value::Array(list)))
        }
        Some(_) => Err(BadRequest::new(
            "`stop` must be a string or a list of strings",
            Some("stop"),
        )),
    }
}

#[cfg(test)]
mod tests;
