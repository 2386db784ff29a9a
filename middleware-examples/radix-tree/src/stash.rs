//! The stash a `/generate` request carries from `on-request` to its response: which cache wrote
//! it, the prompt's node, the prompt text at its end that no token stands for, and (streams) the
//! events so far.
//!
//! Layout: a tag byte, the cache id (u64), the [`NodeRef`] (8 bytes), the length of the pending
//! text (u32) and the text, then the stream state ([`crate::stream`]) to the end. Integers are
//! little-endian.

use crate::tree::NodeRef;

/// Bumped whenever the layout changes.
const TAG: u8 = 3;
/// Bytes before the pending text.
const FIXED: usize = 1 + 8 + 8 + 4;

/// A stash as [`Stash::parse`] reads it, borrowing from the bytes.
#[derive(Debug, PartialEq)]
pub struct Stash<'a> {
    /// The id of the cache that wrote it.
    pub cache: u64,
    /// The prompt's node: the output goes below it.
    pub node: NodeRef,
    /// The end of the prompt's text that tokenised to nothing (whitespace under WordPiece). It
    /// is not in the tree, since a piece needs a token, so it joins the output's first piece.
    pub pending: &'a str,
    /// The stream's events so far; empty for a buffered response.
    pub stream: &'a [u8],
    /// Bytes before `stream`: a new stash keeps them and replaces the rest.
    pub head_len: usize,
}

impl<'a> Stash<'a> {
    /// A stash with no stream state yet; `None` if `pending` is past 4 GiB.
    pub fn encode(cache: u64, node: NodeRef, pending: &str) -> Option<Vec<u8>> {
        let len = u32::try_from(pending.len()).ok()?;
        let mut out = Vec::with_capacity(FIXED + pending.len());
        out.push(TAG);
        out.extend_from_slice(&cache.to_le_bytes());
        out.extend_from_slice(&node.to_bytes());
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(pending.as_bytes());
        Some(out)
    }

    /// Reads what [`Stash::encode`] wrote (and any stream state after it); `None` for anything
    /// else, e.g. a stash of an older layout.
    pub fn parse(bytes: &'a [u8]) -> Option<Self> {
        let (&tag, rest) = bytes.split_first()?;
        let (cache, rest) = rest.split_first_chunk::<8>()?;
        let (node, rest) = rest.split_first_chunk::<8>()?;
        let (len, rest) = rest.split_first_chunk::<4>()?;
        let len = u32::from_le_bytes(*len) as usize;
        if tag != TAG || rest.len() < len {
            return None;
        }
        let (pending, stream) = rest.split_at(len);
        Some(Stash {
            cache: u64::from_le_bytes(*cache),
            node: NodeRef::from_bytes(*node),
            pending: std::str::from_utf8(pending).ok()?,
            stream,
            head_len: FIXED + len,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let node = NodeRef {
            index: 7,
            generation: 2,
        };
        let mut bytes = Stash::encode(42, node, "\n ").expect("small");
        let stash = Stash::parse(&bytes).expect("parse");
        assert_eq!((stash.cache, stash.node, stash.pending), (42, node, "\n "));
        assert!(stash.stream.is_empty());
        let head = stash.head_len;
        bytes.extend_from_slice(b"events");
        let stash = Stash::parse(&bytes).expect("parse");
        assert_eq!((stash.stream, stash.head_len), (&b"events"[..], head));
        for bad in [
            &bytes[..3],
            &bytes[..FIXED + 1],
            b"\x02rest of an old stash",
        ] {
            assert_eq!(Stash::parse(bad), None);
        }
    }
}
