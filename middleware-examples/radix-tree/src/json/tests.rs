//! The reader against serde_json: on generated JSON and on random mutations of it, whatever the
//! reader accepts serde_json accepts with the same value.

use serde::de::IgnoredAny;

use super::*;

/// xorshift64*: deterministic, no dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
}

fn ws(rng: &mut Rng, out: &mut String) {
    if rng.below(4) == 0 {
        out.push_str(rng.pick(&[" ", "\n", "\t ", "\r\n  "]));
    }
}

pub fn number(rng: &mut Rng) -> String {
    let mut s = String::new();
    if rng.below(2) == 0 {
        s.push('-');
    }
    let digits = |rng: &mut Rng, n: usize| -> String {
        (0..n)
            .map(|_| char::from(b'0' + rng.below(10) as u8))
            .collect()
    };
    match rng.below(4) {
        0 => s.push('0'),
        _ => {
            s.push(char::from(b'1' + rng.below(9) as u8));
            let n = rng.pick(&[0, 1, 2, 5, 12, 17, 18, 19, 20, 25]);
            s.push_str(&digits(rng, n));
        }
    }
    if rng.below(2) == 0 {
        s.push('.');
        let n = rng.pick(&[1, 2, 3, 8, 16, 17, 19, 22, 30]);
        s.push_str(&digits(rng, n));
    }
    if rng.below(3) == 0 {
        s.push(rng.pick(&['e', 'E']));
        s.push_str(rng.pick(&["", "+", "-"]));
        let n = rng.pick(&[1, 2, 3]);
        s.push_str(&digits(rng, n));
    }
    s
}

/// Like Python's `repr` of logprobs: shortest round-trip forms, exponents for small values.
pub fn python_float(rng: &mut Rng) -> String {
    let x = -(rng.next() as f64 / u64::MAX as f64).powi(rng.below(12) as i32 + 1) * 20.0;
    match rng.below(3) {
        0 => format!("{x}"),
        1 => {
            // Python writes two exponent digits: 1e-05.
            let s = format!("{x:e}");
            match s.split_once("e-") {
                Some((m, e)) if e.len() == 1 => format!("{m}e-0{e}"),
                _ => s,
            }
        }
        _ => format!("{}", x as f32),
    }
}

pub fn string(rng: &mut Rng) -> String {
    let mut s = String::from("\"");
    for _ in 0..rng.below(12) {
        s.push_str(rng.pick(&[
            "a",
            " the",
            "é",
            "中文",
            "🦀",
            "\\n",
            "\\\"",
            "\\\\",
            "\\/",
            "\\t",
            "\\u00e9",
            "\\u4E2D",
            "\\ud83e\\udd80",
            "\\u0000",
            "<|im_end|>",
            "0123456789abcdef",
        ]));
    }
    s.push('"');
    s
}

pub fn value(rng: &mut Rng, depth: usize, out: &mut String) {
    ws(rng, out);
    let kind = if depth > 3 {
        rng.below(5)
    } else {
        rng.below(7)
    };
    match kind {
        0 => out.push_str(rng.pick(&["null", "true", "false"])),
        1 | 2 => out.push_str(&number(rng)),
        3 | 4 => out.push_str(&string(rng)),
        5 => {
            out.push('[');
            for i in 0..rng.below(4) {
                if i > 0 {
                    out.push(',');
                }
                value(rng, depth + 1, out);
            }
            ws(rng, out);
            out.push(']');
        }
        _ => {
            out.push('{');
            for i in 0..rng.below(4) {
                if i > 0 {
                    out.push(',');
                }
                ws(rng, out);
                out.push_str(&string(rng));
                ws(rng, out);
                out.push(':');
                value(rng, depth + 1, out);
            }
            ws(rng, out);
            out.push('}');
        }
    }
    ws(rng, out);
}

/// Random edits of `bytes`: JSON's structural bytes, escapes, bad UTF-8, truncation.
pub fn mutate(rng: &mut Rng, bytes: &[u8]) -> Vec<u8> {
    let mut v = bytes.to_vec();
    for _ in 0..=rng.below(3) {
        let at = rng.below(v.len() + 1);
        let piece: &[u8] = rng.pick(&[
            &b"\""[..],
            b"\\",
            b"\\u",
            b"\\ud800",
            b"{",
            b"}",
            b"[",
            b"]",
            b",",
            b":",
            b"0",
            b"-",
            b".",
            b"e",
            b"n",
            b" ",
            b"\x01",
            b"\xc3",
            b"\xff",
            b"\"text\":",
            b"null",
        ]);
        match rng.below(4) {
            0 if at < v.len() => {
                v.remove(at);
            }
            1 => v.truncate(at),
            2 if at < v.len() => {
                let end = (at + piece.len()).min(v.len());
                v.splice(at..end, piece.iter().copied());
            }
            _ => {
                v.splice(at..at, piece.iter().copied());
            }
        }
    }
    v
}

fn skips(bytes: &[u8]) -> bool {
    let mut r = Reader::new(bytes);
    r.skip_value().is_some() && r.end().is_some()
}

#[test]
fn skip_value_accepts_exactly_what_serde_ignores() {
    let mut rng = Rng(7);
    let mut accepted = 0;
    for i in 0..60_000 {
        let mut text = String::new();
        value(&mut rng, 0, &mut text);
        let bytes = if i % 3 == 0 {
            text.into_bytes()
        } else {
            mutate(&mut rng, text.as_bytes())
        };
        let serde = serde_json::from_slice::<IgnoredAny>(&bytes).is_ok();
        assert_eq!(skips(&bytes), serde, "{}", String::from_utf8_lossy(&bytes));
        accepted += usize::from(serde);
    }
    assert!(accepted > 20_000, "too few valid cases: {accepted}");
    for bad in [
        &b""[..],
        b"nul",
        b"[1,]",
        b"{,}",
        b"{\"a\" 1}",
        b"[1}",
        b"01",
        b"1.",
        b"1e",
        b"-",
        b"\"\\x\"",
        b"\"\\u12\"",
        b"\"a\x01\"",
        b"[[[]]",
    ] {
        assert!(!skips(bad), "{}", String::from_utf8_lossy(bad));
    }
    // serde_json checks neither UTF-8 nor surrogates in strings it skips, nor depth.
    assert!(skips(b"\"\xff\\ud800\""));
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    assert!(skips(deep.as_bytes()));
    // Objects and lists nested past 64 levels close in order, and only in order.
    let nested = |closers: &str| format!("{}1{closers}", "[{\"k\":".repeat(100));
    let right = "}]".repeat(100);
    for at in [0, 2, 60, 126, 128, 130, 198] {
        let mut wrong = right.clone();
        wrong.replace_range(at..at + 2, "]}");
        for closers in [&right, &wrong] {
            let bytes = nested(closers).into_bytes();
            let serde = serde_json::from_slice::<IgnoredAny>(&bytes).is_ok();
            assert_eq!(skips(&bytes), serde);
            assert_eq!(serde, closers == &right);
        }
    }
}

#[test]
fn numbers_convert_like_serde() {
    let mut rng = Rng(11);
    let mut read = 0;
    for i in 0..200_000 {
        let text = if i % 2 == 0 {
            number(&mut rng)
        } else {
            python_float(&mut rng)
        };
        let serde = serde_json::from_str::<f64>(&text).ok();
        let mut r = Reader::new(text.as_bytes());
        let ours = r.f64().filter(|_| r.end().is_some());
        if let Some(x) = ours {
            read += 1;
            assert_eq!(Some(x.to_bits()), serde.map(f64::to_bits), "{text}");
        }
        let mut r = Reader::new(text.as_bytes());
        if let Some(n) = r.u64().filter(|_| r.end().is_some()) {
            assert_eq!(serde_json::from_str::<u64>(&text).ok(), Some(n), "{text}");
        }
    }
    assert!(
        read > 150_000,
        "too many numbers left to serde_json: {read}"
    );
    for text in [
        "0",
        "-0",
        "-0.125",
        "1e-05",
        "12345678901234567890",
        // Not the nearest f64 (serde_json's arithmetic is off by one bit here), but the same.
        "-2.3841855067985307e-07",
    ] {
        let x = Reader::new(text.as_bytes()).f64();
        let serde = serde_json::from_str::<f64>(text).ok();
        assert_eq!(x.map(f64::to_bits), serde.map(f64::to_bits), "{text}");
    }
    assert_eq!(
        Reader::new(b"-0").f64().map(f64::to_bits),
        Some((-0.0f64).to_bits())
    );
    // Past serde_json's fast arithmetic: left to it.
    for text in [
        "123456789012345678901",
        "1e400",
        "1e-400",
        "0.12345678901234567890123",
    ] {
        assert_eq!(Reader::new(text.as_bytes()).f64(), None, "{text}");
    }
}

#[test]
fn strings_unescape_like_serde() {
    let mut rng = Rng(5);
    let mut out = Vec::new();
    let mut read = 0;
    for i in 0..60_000 {
        let text = string(&mut rng);
        let bytes = if i % 2 == 0 {
            text.into_bytes()
        } else {
            mutate(&mut rng, text.as_bytes())
        };
        let serde = serde_json::from_slice::<String>(&bytes).ok();
        let mut r = Reader::new(&bytes);
        let Some(s) = r.string(&mut out).filter(|_| r.end().is_some()) else {
            continue;
        };
        read += 1;
        let content = match s {
            Str::Borrowed(b) => b,
            Str::Unescaped => &out[..],
        };
        // serde_json also checks UTF-8; the reader leaves that to the caller.
        let expect = std::str::from_utf8(content).ok();
        assert_eq!(
            serde.as_deref(),
            expect,
            "{}",
            String::from_utf8_lossy(&bytes)
        );
    }
    assert!(read > 20_000, "{read}");
    let mut r = Reader::new(br#""plain text" "a\nb""#);
    assert_eq!(r.string(&mut out), Some(Str::Borrowed(b"plain text")));
    assert_eq!(r.string(&mut out), Some(Str::Unescaped));
    assert_eq!(out, b"a\nb");
    for surrogate in [&br#""\ud83e\udd80""#[..], br#""\udd80""#] {
        assert_eq!(Reader::new(surrogate).string(&mut out), None);
    }
}

#[test]
fn objects_and_lists() {
    let body = br#" { "a" : [1, 2 ,3] , "b":{"x":[{}]} ,"c":null } "#;
    let mut r = Reader::new(body);
    let mut seen = Vec::new();
    r.object(|key, r| {
        seen.push(key.to_vec());
        match key {
            b"a" => assert_eq!(r.u32_list()?, [1, 2, 3]),
            b"c" => assert!(r.null()),
            _ => r.skip_value()?,
        }
        Some(())
    })
    .expect("object");
    assert!(r.end().is_some());
    assert_eq!(seen, [&b"a"[..], b"b", b"c"]);
    for bad in [
        &br#"{"a":1,}"#[..],
        br#"{"a":1 "b":2}"#,
        br#"{"\u0061":1}"#,
        "{\"é\":1}".as_bytes(),
        br#"{"a" 1}"#,
        b"{",
    ] {
        let mut r = Reader::new(bad);
        assert!(r.object(|_, r| r.skip_value()).is_none(), "{bad:?}");
    }
    assert_eq!(Reader::new(b"[4294967296]").u32_list(), None);
    assert_eq!(Reader::new(b"[1.0]").u32_list(), None);
    assert_eq!(Reader::new(b"[-1]").u32_list(), None);
    assert_eq!(Reader::new(b" [ ] ").u32_list(), Some(vec![]));
}
