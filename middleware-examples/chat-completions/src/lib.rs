//! `chat-completions`: OpenAI's `/v1/chat/completions` for agentic RL, on SGLang's `/generate`.
//!
//! Training needs the exact tokens the model saw and produced, but a chat harness sends
//! messages. This middleware renders them with the model's own chat template (from
//! `--hf-checkpoint`, through the `tokenizer.chat-template` import) into `text` for
//! `/generate`; the `radix-tree` middleware loaded after it turns that text into `input_ids`
//! from its cache, so a later turn's prompt starts with the earlier prompt and output tokens
//! exactly, and only the new tail is tokenised. On the way back, SGLang's answer (or each of
//! its events) becomes OpenAI's, with reasoning and tool calls parsed out of the text.
//!
//! Load order matters: `chat_completions.wasm` first, `radix_tree.wasm` second. Requests go
//! through middleware in load order and answers in reverse, so the cache records SGLang's
//! answer before this middleware rewrites it.
//!
//! `POST /retrieve_from_text` with `{"messages": [...], "tools": [...]}` is rendered here
//! without a generation prompt and answered by the cache as for `text`.
//!
//! Config (`chat_completions.wasm?tool_format=hermes&reasoning=think`): see [`config`].
//!
//! Layout: [`request`] reads and checks the OpenAI body and writes the `/generate` one,
//! [`render`] is the template engine, [`parse`] splits model text into reasoning, content and
//! tool calls (whole or as it streams), [`response`] writes OpenAI's answer, [`stream`]
//! turns SGLang's events into OpenAI's chunks, and `guest` (wasm only) binds it to
//! `wit/router.wit`.

pub mod config;
pub mod parse;
pub mod render;
pub mod request;
pub mod response;
pub mod stream;

#[cfg(target_arch = "wasm32")]
mod guest;
