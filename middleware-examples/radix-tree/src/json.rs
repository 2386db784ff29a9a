//! A strict JSON reader for the `/generate` hot path, with serde_json as the fallback.
//!
//! serde_json reads any body, but compiled to wasm its generic visitors cost microseconds for a
//! 1 KB response (mostly per logprob entry), and it reads a long prompt twice (a scan, then a
//! UTF-8 check) and copies it twice. [`Reader`] reads the shapes SGLang and slime send and
//! returns `None` for anything else; the callers in [`crate::sglang`] then parse with serde_json
//! as before. So a result of the reader is always one serde_json would give:
//!
//! - it accepts only valid JSON, checked the way serde_json checks it: structure, keys (plain
//!   printable ASCII only), strings, numbers, and skipped values as serde_json skips a
//!   `serde::de::IgnoredAny` (checking neither UTF-8 inside their strings nor their depth);
//! - numbers convert with serde_json's own arithmetic (this workspace builds it without
//!   `float_roundtrip`): the digits in a u64, then one multiplication or division by a power
//!   of ten; forms serde_json takes another path for (a significand past u64, an exponent past
//!   ±308) return `None`;
//! - strings unescape as serde_json unescapes them; a `\u` surrogate returns `None`.
//!
//! Every `None` falls back, so the reader only has to be exact on what it accepts; the tests
//! compare it with serde_json on valid bodies and on many mutations of them.

use crate::scan;

/// A cursor over JSON bytes.
pub struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

/// Where a string's content went: borrowed from the input when it has no escapes, else
/// unescaped into the caller's buffer.
#[derive(Debug, PartialEq)]
pub enum Str<'a> {
    Borrowed(&'a [u8]),
    Unescaped,
}

/// serde_json's `POW10`: `10^k` as the compiler rounds the literal `1ek`.
#[rustfmt::skip]
static POW10: [f64; 309] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
    1e17, 1e18, 1e19, 1e20, 1e21, 1e22, 1e23, 1e24, 1e25, 1e26, 1e27, 1e28, 1e29, 1e30, 1e31,
    1e32, 1e33, 1e34, 1e35, 1e36, 1e37, 1e38, 1e39, 1e40, 1e41, 1e42, 1e43, 1e44, 1e45, 1e46,
    1e47, 1e48, 1e49, 1e50, 1e51, 1e52, 1e53, 1e54, 1e55, 1e56, 1e57, 1e58, 1e59, 1e60, 1e61,
    1e62, 1e63, 1e64, 1e65, 1e66, 1e67, 1e68, 1e69, 1e70, 1e71, 1e72, 1e73, 1e74, 1e75, 1e76,
    1e77, 1e78, 1e79, 1e80, 1e81, 1e82, 1e83, 1e84, 1e85, 1e86, 1e87, 1e88, 1e89, 1e90, 1e91,
    1e92, 1e93, 1e94, 1e95, 1e96, 1e97, 1e98, 1e99, 1e100, 1e101, 1e102, 1e103, 1e104, 1e105,
    1e106, 1e107, 1e108, 1e109, 1e110, 1e111, 1e112, 1e113, 1e114, 1e115, 1e116, 1e117, 1e118,
    1e119, 1e120, 1e121, 1e122, 1e123, 1e124, 1e125, 1e126, 1e127, 1e128, 1e129, 1e130, 1e131,
    1e132, 1e133, 1e134, 1e135, 1e136, 1e137, 1e138, 1e139, 1e140, 1e141, 1e142, 1e143, 1e144,
    1e145, 1e146, 1e147, 1e148, 1e149, 1e150, 1e151, 1e152, 1e153, 1e154, 1e155, 1e156, 1e157,
    1e158, 1e159, 1e160, 1e161, 1e162, 1e163, 1e164, 1e165, 1e166, 1e167, 1e168, 1e169, 1e170,
    1e171, 1e172, 1e173, 1e174, 1e175, 1e176, 1e177, 1e178, 1e179, 1e180, 1e181, 1e182, 1e183,
    1e184, 1e185, 1e186, 1e187, 1e188, 1e189, 1e190, 1e191, 1e192, 1e193, 1e194, 1e195, 1e196,
    1e197, 1e198, 1e199, 1e200, 1e201, 1e202, 1e203, 1e204, 1e205, 1e206, 1e207, 1e208, 1e209,
    1e210, 1e211, 1e212, 1e213, 1e214, 1e215, 1e216, 1e217, 1e218, 1e219, 1e220, 1e221, 1e222,
    1e223, 1e224, 1e225, 1e226, 1e227, 1e228, 1e229, 1e230, 1e231, 1e232, 1e233, 1e234, 1e235,
    1e236, 1e237, 1e238, 1e239, 1e240, 1e241, 1e242, 1e243, 1e244, 1e245, 1e246, 1e247, 1e248,
    1e249, 1e250, 1e251, 1e252, 1e253, 1e254, 1e255, 1e256, 1e257, 1e258, 1e259, 1e260, 1e261,
    1e262, 1e263, 1e264, 1e265, 1e266, 1e267, 1e268, 1e269, 1e270, 1e271, 1e272, 1e273, 1e274,
    1e275, 1e276, 1e277, 1e278, 1e279, 1e280, 1e281, 1e282, 1e283, 1e284, 1e285, 1e286, 1e287,
    1e288, 1e289, 1e290, 1e291, 1e292, 1e293, 1e294, 1e295, 1e296, 1e297, 1e298, 1e299, 1e300,
    1e301, 1e302, 1e303, 1e304, 1e305, 1e306, 1e307, 1e308,
];

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes, pos: 0 }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let byte = self.peek()?;
        self.pos += 1;
        Some(byte)
    }

    fn eat(&mut self, byte: u8) -> Option<()> {
        (self.peek()? == byte).then(|| self.pos += 1)
    }

    fn literal<const N: usize>(&mut self, literal: &[u8; N]) -> Option<()> {
        // A fixed-size comparison compiles to one integer compare, not a `memcmp` call.
        let next: &[u8; N] = self.bytes.get(self.pos..self.pos + N)?.try_into().ok()?;
        (next == literal).then(|| self.pos += N)
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\t' | b'\r') = self.peek() {
            self.pos += 1;
        }
    }

    /// Where the cursor is, to [`Reader::rewind`] to.
    pub fn mark(&self) -> usize {
        self.pos
    }

    /// Moves the cursor back to a [`Reader::mark`].
    pub fn rewind(&mut self, mark: usize) {
        self.pos = mark;
    }

    /// Whitespace, then `byte`.
    pub fn expect(&mut self, byte: u8) -> Option<()> {
        self.ws();
        self.eat(byte)
    }

    /// Whitespace, then the end of the input.
    pub fn end(&mut self) -> Option<()> {
        self.ws();
        (self.pos == self.bytes.len()).then_some(())
    }

    /// Reads `null` if it comes next: the `None` of an `Option` field.
    pub fn null(&mut self) -> bool {
        self.ws();
        self.literal(b"null").is_some()
    }

    /// An object: `member(key, self)` must read each member's value. Keys must be printable
    /// ASCII without escapes; other keys (which serde_json would unescape) return `None`.
    pub fn object(
        &mut self,
        mut member: impl FnMut(&'a [u8], &mut Self) -> Option<()>,
    ) -> Option<()> {
        self.ws();
        self.eat(b'{')?;
        self.ws();
        if self.eat(b'}').is_some() {
            return Some(());
        }
        loop {
            let key = self.key()?;
            self.ws();
            self.eat(b':')?;
            member(key, self)?;
            self.ws();
            match self.next()? {
                b',' => self.ws(),
                b'}' => return Some(()),
                _ => return None,
            }
        }
    }

    fn key(&mut self) -> Option<&'a [u8]> {
        self.eat(b'"')?;
        let start = self.pos;
        let len = self.bytes[start..]
            .iter()
            .position(|&b| !(0x20..0x80).contains(&b) || b == b'"' || b == b'\\')?;
        self.pos += len;
        self.eat(b'"')?;
        Some(&self.bytes[start..start + len])
    }

    /// A list: `item(self)` must read each item.
    pub fn list(&mut self, mut item: impl FnMut(&mut Self) -> Option<()>) -> Option<()> {
        self.ws();
        self.eat(b'[')?;
        self.ws();
        if self.eat(b']').is_some() {
            return Some(());
        }
        loop {
            item(self)?;
            self.ws();
            match self.next()? {
                b',' => {}
                b']' => return Some(()),
                _ => return None,
            }
        }
    }

    /// A string, unescaped: borrowed when it has no escapes, else written to `out` (cleared
    /// first). Not checked as UTF-8, which serde_json checks in strings it returns: the
    /// caller must.
    pub fn string(&mut self, out: &mut Vec<u8>) -> Option<Str<'a>> {
        self.ws();
        self.eat(b'"')?;
        let start = self.pos;
        let mut run = start;
        let mut escaped = false;
        loop {
            let stop = self.pos + scan::string_stop(&self.bytes[self.pos..]);
            match self.bytes.get(stop)? {
                b'"' => {
                    self.pos = stop + 1;
                    if !escaped {
                        return Some(Str::Borrowed(&self.bytes[start..stop]));
                    }
                    out.extend_from_slice(&self.bytes[run..stop]);
                    return Some(Str::Unescaped);
                }
                b'\\' => {
                    if !escaped {
                        out.clear();
                        escaped = true;
                    }
                    out.extend_from_slice(&self.bytes[run..stop]);
                    self.pos = stop + 1;
                    self.unescape(out)?;
                    run = self.pos;
                }
                // A control character.
                _ => return None,
            }
        }
    }

    fn unescape(&mut self, out: &mut Vec<u8>) -> Option<()> {
        let byte = match self.next()? {
            b'"' => b'"',
            b'\\' => b'\\',
            b'/' => b'/',
            b'b' => 0x08,
            b'f' => 0x0c,
            b'n' => b'\n',
            b'r' => b'\r',
            b't' => b'\t',
            b'u' => {
                // A surrogate (half of a pair, or alone) is left to serde_json.
                let c = char::from_u32(self.hex4()?)?;
                out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
                return Some(());
            }
            _ => return None,
        };
        out.push(byte);
        Some(())
    }

    fn hex4(&mut self) -> Option<u32> {
        let digits = self.bytes.get(self.pos..self.pos + 4)?;
        let mut value = 0;
        for &d in digits {
            value = value * 16 + char::from(d).to_digit(16)?;
        }
        self.pos += 4;
        Some(value)
    }

    /// The raw text of the next value (skipped as by [`Reader::skip_value`]).
    pub fn raw_value(&mut self) -> Option<&'a [u8]> {
        self.ws();
        let start = self.pos;
        self.skip_value()?;
        Some(&self.bytes[start..self.pos])
    }

    /// Skips one value, accepting what serde_json accepts for `IgnoredAny` (its
    /// `ignore_value`): no UTF-8 check inside strings, no depth limit.
    pub fn skip_value(&mut self) -> Option<()> {
        let mut open = Open::default();
        loop {
            self.ws();
            match self.peek()? {
                b'n' => self.literal(b"null")?,
                b't' => self.literal(b"true")?,
                b'f' => self.literal(b"false")?,
                b'-' | b'0'..=b'9' => self.skip_number()?,
                b'"' => self.skip_string()?,
                b'[' | b'{' => {
                    let object = self.next()? == b'{';
                    self.ws();
                    if self.eat(if object { b'}' } else { b']' }).is_none() {
                        open.push(object);
                        if object {
                            self.member_key()?;
                        }
                        continue;
                    }
                }
                _ => return None,
            }
            // After a value: close containers until a comma starts the next value.
            loop {
                let Some(object) = open.last() else {
                    return Some(());
                };
                self.ws();
                match self.next()? {
                    b',' => {
                        if object {
                            self.ws();
                            self.member_key()?;
                        }
                        break;
                    }
                    b']' if !object => {
                        open.pop();
                    }
                    b'}' if object => {
                        open.pop();
                    }
                    _ => return None,
                }
            }
        }
    }

    /// A key inside a skipped object, and its colon.
    fn member_key(&mut self) -> Option<()> {
        self.skip_string()?;
        self.ws();
        self.eat(b':')
    }

    /// Skips a string as serde_json's `ignore_str` does: escapes checked, UTF-8 not.
    fn skip_string(&mut self) -> Option<()> {
        self.eat(b'"')?;
        loop {
            self.pos += scan::string_stop(&self.bytes[self.pos..]);
            match self.next()? {
                b'"' => return Some(()),
                b'\\' => match self.next()? {
                    b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {}
                    b'u' => {
                        self.hex4()?;
                    }
                    _ => return None,
                },
                _ => return None,
            }
        }
    }

    fn skip_number(&mut self) -> Option<()> {
        let _ = self.eat(b'-');
        if !matches!(self.digits(), [b'0'] | [b'1'..=b'9', ..]) {
            return None;
        }
        if self.eat(b'.').is_some() && self.digits().is_empty() {
            return None;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.pos += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.pos += 1;
            }
            if self.digits().is_empty() {
                return None;
            }
        }
        Some(())
    }

    /// The digits at the cursor (maybe none), consumed.
    fn digits(&mut self) -> &'a [u8] {
        let start = self.pos;
        let rest = &self.bytes[start..];
        // Eight at a time: a logprob has ~17.
        let (words, _) = rest.as_chunks::<8>();
        let whole = words.iter().take_while(|w| all_digits(**w)).count() * 8;
        let len = whole
            + rest[whole..]
                .iter()
                .take_while(|b| b.is_ascii_digit())
                .count();
        self.pos += len;
        &rest[..len]
    }

    /// An integer part: `0`, or digits without a leading zero; `None` past `u64::MAX`.
    fn integer(&mut self) -> Option<u64> {
        match self.peek()? {
            b'0' => {
                self.pos += 1;
                (!matches!(self.peek(), Some(b'0'..=b'9'))).then_some(0)
            }
            b'1'..=b'9' => self.append_digits(0).map(|(value, _)| value),
            _ => None,
        }
    }

    /// Reads the digits at the cursor onto `value` as serde_json accumulates them: the new
    /// value and the number of digits, or `None` past `u64::MAX`. Eight digits at a time while
    /// eight more cannot overflow, then one by one with serde_json's test (`checked_mul` would
    /// multiply in 128 bits, a library call in wasm32).
    fn append_digits(&mut self, mut value: u64) -> Option<(u64, usize)> {
        let start = self.pos;
        while let Some(&word) = self.bytes[self.pos..].first_chunk::<8>() {
            if !all_digits(word) || value > (u64::MAX - 99_999_999) / 100_000_000 {
                break;
            }
            value = value * 100_000_000 + eight_digits(word);
            self.pos += 8;
        }
        let max = u64::MAX / 10;
        while let Some(d @ b'0'..=b'9') = self.peek() {
            let digit = u64::from(d - b'0');
            if value > max || (value == max && digit > u64::MAX % 10) {
                return None;
            }
            value = value * 10 + digit;
            self.pos += 1;
        }
        Some((value, self.pos - start))
    }

    /// A number as serde_json deserialises it into a `u64`: digits only.
    pub fn u64(&mut self) -> Option<u64> {
        self.ws();
        let value = self.integer()?;
        // A fraction or exponent makes it a float, which serde_json refuses for a u64.
        (!matches!(self.peek(), Some(b'.' | b'e' | b'E'))).then_some(value)
    }

    /// A list of numbers as serde_json deserialises it into a `Vec<u32>`.
    pub fn u32_list(&mut self) -> Option<Vec<u32>> {
        // Each id takes at least two bytes ("5,"); a guess that rarely needs to grow.
        let mut out = Vec::with_capacity((self.remaining() / 4).min(4096));
        self.list(|r| {
            out.push(u32::try_from(r.u64()?).ok()?);
            Some(())
        })?;
        Some(out)
    }

    /// A number as serde_json (without `float_roundtrip`) deserialises it into an `f64`.
    pub fn f64(&mut self) -> Option<f64> {
        self.ws();
        let positive = self.eat(b'-').is_none();
        let mut significand = self.integer()?;
        let mut exponent: i32 = 0;
        let mut float = false;
        if self.eat(b'.').is_some() {
            float = true;
            let (value, digits) = self.append_digits(significand)?;
            if digits == 0 {
                return None;
            }
            significand = value;
            exponent = -i32::try_from(digits).ok()?;
        }
        if let Some(b'e' | b'E') = self.peek() {
            float = true;
            self.pos += 1;
            let positive_exp = match self.peek() {
                Some(b'-') => {
                    self.pos += 1;
                    false
                }
                Some(b'+') => {
                    self.pos += 1;
                    true
                }
                _ => true,
            };
            let digits = self.digits();
            if digits.is_empty() {
                return None;
            }
            let exp = digits.iter().try_fold(0i32, |e, &d| {
                e.checked_mul(10)?.checked_add(i32::from(d - b'0'))
            })?;
            exponent = if positive_exp {
                exponent.saturating_add(exp)
            } else {
                exponent.saturating_sub(exp)
            };
        }
        let mut f = significand as f64;
        if float {
            // serde_json's `f64_from_parts` for exponents within the table.
            let pow = *POW10.get(exponent.unsigned_abs() as usize)?;
            if exponent >= 0 {
                f *= pow;
                if f.is_infinite() {
                    return None;
                }
            } else {
                f /= pow;
            }
        }
        // An integer: serde_json's u64 or i64 converted to f64, or its f64 for `-0` and
        // below i64::MIN, all of which equal this.
        Some(if positive { f } else { -f })
    }
}

/// The containers still open in a skipped value, innermost last, one bit each (set for an
/// object): no allocation below 64 levels.
#[derive(Default)]
struct Open {
    depth: usize,
    bits: u64,
    /// Full words of outer levels.
    outer: Vec<u64>,
}

impl Open {
    fn push(&mut self, object: bool) {
        if self.depth > 0 && self.depth.is_multiple_of(64) {
            self.outer.push(self.bits);
            self.bits = 0;
        }
        self.bits = (self.bits << 1) | u64::from(object);
        self.depth += 1;
    }

    fn pop(&mut self) {
        self.depth -= 1;
        self.bits >>= 1;
        if self.depth > 0 && self.depth.is_multiple_of(64) {
            self.bits = self.outer.pop().unwrap_or_default();
        }
    }

    /// Whether the innermost open container is an object; `None` when none is open.
    fn last(&self) -> Option<bool> {
        (self.depth > 0).then_some(self.bits & 1 == 1)
    }
}

/// True when all eight bytes are ASCII digits.
fn all_digits(word: [u8; 8]) -> bool {
    let x = u64::from_le_bytes(word);
    // Each byte's high nibble is 3, and adding 6 to its low nibble does not carry (not above 9).
    let high = x & 0xf0f0_f0f0_f0f0_f0f0;
    let carried = (x.wrapping_add(0x0606_0606_0606_0606) & 0xf0f0_f0f0_f0f0_f0f0) >> 4;
    high | carried == 0x3333_3333_3333_3333
}

/// The value of eight ASCII digits, first digit most significant (three multiplications
/// instead of eight dependent ones).
fn eight_digits(word: [u8; 8]) -> u64 {
    // Byte i holds digit i; pairs, then fours, then all eight, each step in the high half of
    // a product whose overflowing bits are dropped on purpose.
    let x = u64::from_le_bytes(word) - 0x3030_3030_3030_3030;
    let x = x * 10 + (x >> 8);
    let mask = 0x0000_00ff_0000_00ff;
    let high = (x & mask).wrapping_mul(0x000f_4240_0000_0064);
    let low = ((x >> 16) & mask).wrapping_mul(0x0000_2710_0000_0001);
    high.wrapping_add(low) >> 32
}

#[cfg(test)]
pub(crate) mod tests;

#[cfg(test)]
mod digit_tests {
    use super::*;

    #[test]
    fn eight_at_a_time() {
        for word in [*b"00000000", *b"12345678", *b"99999999", *b"09876543"] {
            assert!(all_digits(word));
            let expect: u64 = std::str::from_utf8(&word)
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            assert_eq!(eight_digits(word), expect);
        }
        for b in (0..=255u8).filter(|b| !b.is_ascii_digit()) {
            for at in 0..8 {
                let mut word = *b"12345678";
                word[at] = b;
                assert!(!all_digits(word), "{word:?}");
            }
        }
        // Up to u64::MAX and one past, whole or after a start that fits.
        let append = |value, digits: &str| {
            let mut r = Reader::new(digits.as_bytes());
            r.append_digits(value).map(|(v, n)| {
                assert_eq!(n, digits.len());
                v
            })
        };
        for digits in [
            "18446744073709551615",
            "18446744073709551616",
            "99999999999999999999",
        ] {
            assert_eq!(append(0, digits), digits.parse().ok(), "{digits}");
        }
        for (value, digits) in [
            (184_467_440_737u64, "09551615"),
            (184_467_440_737, "09551616"),
        ] {
            assert_eq!(
                append(value, digits),
                format!("{value}{digits}").parse().ok()
            );
        }
    }
}
