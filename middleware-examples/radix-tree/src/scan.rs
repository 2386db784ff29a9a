//! The two byte scans that grow with the prompt: finding where a JSON string's plain run ends
//! (a 32k-token prompt is a 150 KB string) and comparing text with cached text.
//!
//! Compiled to wasm without SIMD both go at most 8 bytes at a time; the component uses 128-bit
//! SIMD (`simd128`, enabled by default in wasmtime) for 16 bytes in a few instructions. The
//! functions carry `#[target_feature]` rather than the whole crate, which is safe in wasm: an
//! engine without SIMD rejects the module when loading it, never mid-call. Native builds use the
//! portable versions; the tests check whichever the target uses against the portable ones and
//! a byte-by-byte reference (run them under a wasm runtime to cover the SIMD versions).

/// Index of the first byte of `bytes` that is `"`, `\` or a control character (below 0x20),
/// i.e. where a run of plain JSON string content stops; `bytes.len()` if none.
pub fn string_stop(bytes: &[u8]) -> usize {
    #[cfg(target_arch = "wasm32")]
    return simd::string_stop(bytes);
    #[cfg(not(target_arch = "wasm32"))]
    return portable::string_stop(bytes);
}

/// Length of the common prefix of `a` and `b`.
pub fn common_prefix_len(a: &[u8], b: &[u8]) -> usize {
    #[cfg(target_arch = "wasm32")]
    return simd::common_prefix_len(a, b);
    #[cfg(not(target_arch = "wasm32"))]
    return portable::common_prefix_len(a, b);
}

/// `a == b`, without `memcmp`, which in wasm is a call and a byte loop.
pub fn bytes_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    // Most pieces are a few bytes: compared inline.
    if a.len() <= 16 {
        return a.iter().zip(b).all(|(x, y)| x == y);
    }
    common_prefix_len(a, b) == a.len()
}

fn is_string_stop(b: u8) -> bool {
    b < 0x20 || b == b'"' || b == b'\\'
}

#[cfg(any(not(target_arch = "wasm32"), test))]
mod portable {
    use super::is_string_stop;

    const ONES: u64 = u64::MAX / 255;
    const HIGHS: u64 = ONES << 7;

    /// High bit of each byte of `x` that is zero; exact up to the lowest one (a borrow can
    /// flag bytes above it), which is the only one used.
    fn zero_bytes(x: u64) -> u64 {
        x.wrapping_sub(ONES) & !x & HIGHS
    }

    pub fn string_stop(bytes: &[u8]) -> usize {
        let (words, _) = bytes.as_chunks::<8>();
        for (i, word) in words.iter().enumerate() {
            let x = u64::from_le_bytes(*word);
            let control = x.wrapping_sub(ONES * 0x20) & !x & HIGHS;
            let quote = zero_bytes(x ^ (ONES * u64::from(b'"')));
            let backslash = zero_bytes(x ^ (ONES * u64::from(b'\\')));
            let hits = control | quote | backslash;
            if hits != 0 {
                return i * 8 + (hits.trailing_zeros() / 8) as usize;
            }
        }
        let done = words.len() * 8;
        done + bytes[done..]
            .iter()
            .position(|&b| is_string_stop(b))
            .unwrap_or(bytes.len() - done)
    }

    pub fn common_prefix_len(a: &[u8], b: &[u8]) -> usize {
        let n = a.len().min(b.len());
        let (a, b) = (&a[..n], &b[..n]);
        let (words_a, _) = a.as_chunks::<8>();
        let (words_b, _) = b.as_chunks::<8>();
        for (i, (x, y)) in words_a.iter().zip(words_b).enumerate() {
            let diff = u64::from_le_bytes(*x) ^ u64::from_le_bytes(*y);
            if diff != 0 {
                return i * 8 + (diff.trailing_zeros() / 8) as usize;
            }
        }
        let mut i = words_a.len() * 8;
        while i < n && a[i] == b[i] {
            i += 1;
        }
        i
    }
}

#[cfg(target_arch = "wasm32")]
mod simd {
    use core::arch::wasm32::{
        u8x16, u8x16_all_true, u8x16_bitmask, u8x16_eq, u8x16_lt, u8x16_splat, u8x16_sub_sat, v128,
        v128_and, v128_any_true, v128_or,
    };

    use super::is_string_stop;

    /// Sixteen bytes as a vector (compiles to one `v128.load`).
    #[inline]
    #[target_feature(enable = "simd128")]
    fn load(c: &[u8; 16]) -> v128 {
        u8x16(
            c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8], c[9], c[10], c[11], c[12], c[13],
            c[14], c[15],
        )
    }

    /// Non-zero in the lanes of `v` that are string stops: `0x20 - b` saturates to zero for
    /// every byte but a control character, which is cheaper than an unsigned comparison.
    #[inline]
    #[target_feature(enable = "simd128")]
    fn stops(v: v128) -> v128 {
        v128_or(
            u8x16_sub_sat(u8x16_splat(0x20), v),
            v128_or(
                u8x16_eq(v, u8x16_splat(b'"')),
                u8x16_eq(v, u8x16_splat(b'\\')),
            ),
        )
    }

    #[target_feature(enable = "simd128")]
    pub fn string_stop(bytes: &[u8]) -> usize {
        // 64 bytes per test while nothing stops (most of a prompt), then 16 to find where.
        let (blocks, _) = bytes.as_chunks::<64>();
        let mut done = 0;
        for block in blocks {
            let (c, _) = block.as_chunks::<16>();
            let hits = v128_or(
                v128_or(stops(load(&c[0])), stops(load(&c[1]))),
                v128_or(stops(load(&c[2])), stops(load(&c[3]))),
            );
            if v128_any_true(hits) {
                break;
            }
            done += 64;
        }
        let rest = &bytes[done..];
        let (chunks, _) = rest.as_chunks::<16>();
        let (control, quote, backslash) =
            (u8x16_splat(0x20), u8x16_splat(b'"'), u8x16_splat(b'\\'));
        for (i, chunk) in chunks.iter().enumerate() {
            let v = load(chunk);
            let hits = v128_or(
                u8x16_lt(v, control),
                v128_or(u8x16_eq(v, quote), u8x16_eq(v, backslash)),
            );
            if v128_any_true(hits) {
                return done + i * 16 + u8x16_bitmask(hits).trailing_zeros() as usize;
            }
        }
        let tail = done + chunks.len() * 16;
        tail + bytes[tail..]
            .iter()
            .position(|&b| is_string_stop(b))
            .unwrap_or(bytes.len() - tail)
    }

    #[target_feature(enable = "simd128")]
    pub fn common_prefix_len(a: &[u8], b: &[u8]) -> usize {
        let n = a.len().min(b.len());
        let (a, b) = (&a[..n], &b[..n]);
        // 64 bytes per test while equal (most of a cached prompt), then 16 to find where not.
        let (blocks_a, _) = a.as_chunks::<64>();
        let (blocks_b, _) = b.as_chunks::<64>();
        let mut done = 0;
        for (x, y) in blocks_a.iter().zip(blocks_b) {
            let ((x, _), (y, _)) = (x.as_chunks::<16>(), y.as_chunks::<16>());
            let same = v128_and(
                v128_and(
                    u8x16_eq(load(&x[0]), load(&y[0])),
                    u8x16_eq(load(&x[1]), load(&y[1])),
                ),
                v128_and(
                    u8x16_eq(load(&x[2]), load(&y[2])),
                    u8x16_eq(load(&x[3]), load(&y[3])),
                ),
            );
            if !u8x16_all_true(same) {
                break;
            }
            done += 64;
        }
        let (chunks_a, _) = a[done..].as_chunks::<16>();
        let (chunks_b, _) = b[done..].as_chunks::<16>();
        for (i, (x, y)) in chunks_a.iter().zip(chunks_b).enumerate() {
            let same = u8x16_eq(load(x), load(y));
            if !u8x16_all_true(same) {
                return done + i * 16 + (!u8x16_bitmask(same)).trailing_zeros() as usize;
            }
        }
        let mut i = done + chunks_a.len() * 16;
        while i < n && a[i] == b[i] {
            i += 1;
        }
        i
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes with stops and differences at every position and alignment.
    fn cases() -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for len in (0..70).chain([127, 128, 129, 200, 257]) {
            for at in 0..len {
                for stop in [b'"', b'\\', 0x00, 0x1f, b'\n'] {
                    let mut v: Vec<u8> = (0..len).map(|i| b' ' + (i % 90) as u8).collect();
                    // Bytes that SWAR tricks could confuse with stops.
                    for (i, b) in v.iter_mut().enumerate() {
                        if i % 7 == 3 {
                            *b = [0x20, 0x21, 0x5d, 0x80, 0xa2, 0xdc, 0xff][i % 5];
                        }
                    }
                    v[at] = stop;
                    out.push(v);
                }
            }
        }
        out
    }

    #[test]
    fn string_stop_finds_the_first_stop() {
        for v in cases() {
            let expect = v.iter().position(|&b| is_string_stop(b)).unwrap_or(v.len());
            assert_eq!(string_stop(&v), expect, "{v:?}");
            assert_eq!(portable::string_stop(&v), expect, "{v:?}");
        }
        assert_eq!(string_stop(b""), 0);
        let plain = "héllo wörld, plain text only";
        assert_eq!(string_stop(plain.as_bytes()), plain.len());
    }

    #[test]
    fn bytes_eq_is_equality() {
        for v in cases() {
            for at in 0..v.len() {
                let mut w = v.clone();
                w[at] ^= 1;
                assert!(bytes_eq(&v, &v.clone()));
                assert!(!bytes_eq(&v, &w));
                assert!(!bytes_eq(&v[..at], &v));
                assert!(bytes_eq(&v[..at], &w[..at]));
            }
        }
    }

    #[test]
    fn common_prefix_at_every_offset() {
        assert_eq!(common_prefix_len(b"", b"abc"), 0);
        assert_eq!(common_prefix_len(b"abc", b"abc"), 3);
        assert_eq!(common_prefix_len(b"abcdefghij", b"abcdefghiX"), 9);
        for v in cases() {
            for at in 0..=v.len() {
                let mut w = v.clone();
                if at < w.len() {
                    w[at] ^= 0x40;
                }
                for (a, b) in [(&v[..], &w[..]), (&w[..], &v[..]), (&v[..at], &w[..])] {
                    let expect = a.iter().zip(b).take_while(|(x, y)| x == y).count();
                    assert_eq!(common_prefix_len(a, b), expect);
                    assert_eq!(portable::common_prefix_len(a, b), expect);
                }
            }
        }
    }
}
