//! A request's prompt as chained hashes of fixed-size blocks, the way engines key their KV
//! cache blocks: block `i`'s hash covers the whole prompt up to its end, so two requests share
//! block `i` only if they share everything before it.
//!
//! Read from the body in one pass and without a JSON tree: the prompt field is found with a
//! SIMD substring search, and its value is hashed as the bytes it is written in, in blocks of
//! [`ID_BYTES_PER_BLOCK`] bytes of `input_ids` (30-40 ids) or [`TEXT_BYTES_PER_BLOCK`] bytes of
//! text (about 16 tokens). One client writes the same ids the same way every turn, so equal
//! prompt prefixes give equal leading blocks without parsing a single number. Only whole
//! blocks count, as in an engine's cache. A body this reader cannot place (a batch, no prompt
//! field) has no blocks and is routed by load alone.

use memchr::memmem;
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Bytes per block of an `input_ids` prompt: 30-40 ids as JSON writes them. Coarser than an
/// engine's pages, which only costs precision in the matched length, and it keeps a 32k-token
/// prompt to about a thousand hashes.
pub const ID_BYTES_PER_BLOCK: usize = 256;

/// Bytes per block of a text prompt: about 16 tokens of English.
pub const TEXT_BYTES_PER_BLOCK: usize = 64;

/// A prompt's chained block hashes and the tokens each block stands for (estimated).
#[derive(Debug, Default, PartialEq)]
pub struct Prompt {
    /// Block `i`'s hash covers the prompt from its start to the end of block `i`.
    pub blocks: Vec<u64>,
    /// About how many tokens one block holds, for capacity accounting and metrics.
    pub tokens_per_block: u32,
}

/// The prompt of a request to `path` (no blocks if it has none this reader can find).
pub fn blocks(path: &str, body: &[u8]) -> Prompt {
    let fields: &[&[u8]] = match path {
        "/generate" => &[b"\"input_ids\"", b"\"text\""],
        "/v1/completions" => &[b"\"prompt\""],
        "/v1/chat/completions" => &[b"\"messages\""],
        _ => return Prompt::default(),
    };
    for field in fields {
        if let Some(value) = field_value(body, field) {
            return match value.first() {
                Some(b'[') if *field == b"\"input_ids\"" => id_blocks(value),
                Some(b'"') => text_blocks(string_content(value)),
                Some(b'[') => text_blocks(value),
                _ => Prompt::default(),
            };
        }
    }
    Prompt::default()
}

/// The bytes from the value of top-level-looking key `key` to the end of the body. A key
/// inside a string value may be found first; its "value" then fails the checks after it and
/// the next occurrence is tried.
fn field_value<'a>(body: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    let finder = memmem::Finder::new(key);
    let mut from = 0;
    while let Some(found) = finder.find(&body[from..]) {
        let after = from + found + key.len();
        let rest = skip_ws(&body[after..]);
        if let Some(value) = rest.strip_prefix(b":") {
            let value = skip_ws(value);
            if matches!(value.first(), Some(b'[' | b'"')) {
                return Some(value);
            }
        }
        from = after;
    }
    None
}

fn skip_ws(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(bytes.len());
    &bytes[start..]
}

/// Blocks of an `input_ids` array (its bytes up to the closing bracket). A list of lists (a
/// batch) has no single prompt.
fn id_blocks(array: &[u8]) -> Prompt {
    if skip_ws(&array[1..]).first() == Some(&b'[') {
        return Prompt::default();
    }
    let end = memchr::memchr(b']', array).unwrap_or(array.len());
    let ids = &array[..end];
    // Ids per block from the first few kilobytes: a count, not a parse.
    let sample = &ids[..ids.len().min(4096)];
    let commas = memchr::memchr_iter(b',', sample).count().max(1);
    let per_block = (ID_BYTES_PER_BLOCK * commas).div_ceil(sample.len().max(1));
    Prompt {
        blocks: chained(ids, ID_BYTES_PER_BLOCK),
        tokens_per_block: u32::try_from(per_block.max(1)).unwrap_or(u32::MAX),
    }
}

/// Blocks of text (a prompt string, chat messages): about four bytes a token.
fn text_blocks(bytes: &[u8]) -> Prompt {
    Prompt {
        blocks: chained(bytes, TEXT_BYTES_PER_BLOCK),
        tokens_per_block: (TEXT_BYTES_PER_BLOCK / 4) as u32,
    }
}

/// The chained hashes of the whole `size`-byte blocks of `bytes`.
fn chained(bytes: &[u8], size: usize) -> Vec<u64> {
    let mut hash = 0u64;
    bytes
        .chunks_exact(size)
        .map(|chunk| {
            hash = xxh3_64_with_seed(chunk, hash);
            hash
        })
        .collect()
}

/// The content of the JSON string at the start of `value`, escapes left as written.
fn string_content(value: &[u8]) -> &[u8] {
    let body = &value[1..];
    let mut at = 0;
    while let Some(stop) = memchr::memchr2(b'"', b'\\', &body[at..]) {
        match body[at + stop] {
            b'"' => return &body[..at + stop],
            _ => at += stop + 2,
        }
        if at >= body.len() {
            break;
        }
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize, sep: &str) -> String {
        (0..n)
            .map(|i| (1000 + i).to_string())
            .collect::<Vec<_>>()
            .join(sep)
    }

    #[test]
    fn a_longer_prompt_extends_the_blocks_of_its_prefix() {
        let turn1 = format!(
            r#"{{"rid":"a","input_ids":[{}],"sampling_params":{{}}}}"#,
            ids(100, ", ")
        );
        let turn2 = format!(
            r#"{{"input_ids": [{}], "return_logprob": true}}"#,
            ids(200, ", ")
        );
        let (a, b) = (
            blocks("/generate", turn1.as_bytes()),
            blocks("/generate", turn2.as_bytes()),
        );
        // 100 ids of "1000, " (6 bytes): 600 bytes, two whole 256-byte blocks of ~43 ids.
        assert_eq!(a.blocks.len(), 2);
        assert_eq!(a.tokens_per_block, 43);
        assert_eq!(b.blocks.len(), 4);
        assert_eq!(
            a.blocks[..],
            b.blocks[..2],
            "same first ids, same first blocks"
        );
        let other = format!(r#"{{"input_ids":[7, {}]}}"#, ids(100, ", "));
        let c = blocks("/generate", other.as_bytes());
        assert!(
            c.blocks.iter().all(|h| !a.blocks.contains(h)),
            "a different first id changes every block"
        );
    }

    #[test]
    fn text_blocks_and_what_has_none() {
        let long = "x".repeat(200);
        let body = format!(r#"{{"text":"say \"{long}\"","stream":true}}"#);
        let blocks_of = |b: &str| blocks("/generate", b.as_bytes()).blocks;
        assert_eq!(
            blocks_of(&body).len(),
            3,
            "204 content bytes: three 64-byte blocks"
        );
        let longer =
            format!(r#"{{"text":"say \"{long}\" and more text here to pass the next block"}}"#);
        assert_eq!(blocks_of(&longer)[..3], blocks_of(&body)[..]);
        assert!(
            blocks_of(r#"{"input_ids":[[1,2],[3,4]]}"#).is_empty(),
            "a batch"
        );
        assert!(blocks_of(r#"{"sampling_params":{}}"#).is_empty());
        assert!(blocks("/health", body.as_bytes()).blocks.is_empty());
        // A key that appears inside a string first is skipped.
        let tricky = format!(
            r#"{{"x":"see \"input_ids\": [1, 2]","input_ids":[{}]}}"#,
            ids(60, ",")
        );
        assert_eq!(blocks_of(&tricky).len(), 1);
    }
}
