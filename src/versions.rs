//! Weight versions: what each worker runs, in what order versions came, and reading a
//! version out of a worker's answer. Versions are strings (SGLang's `weight_version`); two
//! order numerically when both parse as integers, else by the order the router first saw
//! them.

use std::cmp::Ordering;
use std::sync::{LazyLock, RwLock};

use memchr::memmem;
use tokio::sync::Notify;

/// The versions seen, in arrival order, and a wake-up for requests waiting on one.
#[derive(Debug, Default)]
pub struct Versions {
    seen: RwLock<Vec<String>>,
    changed: Notify,
}

impl Versions {
    /// Notes `version` (the first time it is seen it joins the arrival order) and wakes the
    /// requests waiting for a worker at a newer version.
    pub fn record(&self, version: &str) {
        let known = self.read().iter().any(|v| v == version);
        if !known {
            let mut seen = self.seen.write().unwrap_or_else(|p| p.into_inner());
            if !seen.iter().any(|v| v == version) {
                seen.push(version.to_owned());
            }
        }
        self.changed.notify_waiters();
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<String>> {
        self.seen.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Resolves when a version is recorded (or a worker state that could unblock changes).
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// Wakes the waiters without a new version (a worker revived or was added).
    pub fn poke(&self) {
        self.changed.notify_waiters();
    }

    /// `a` against `b`; an unknown version (`None`) is older than any known one.
    pub fn cmp(&self, a: Option<&str>, b: Option<&str>) -> Ordering {
        self.cmp_unlocked(&self.read(), a, b)
    }

    /// How many known versions are newer than `version` and no newer than `newest`.
    pub fn behind(&self, version: Option<&str>, newest: Option<&str>) -> usize {
        if self.cmp(version, newest) != Ordering::Less {
            return 0;
        }
        let seen = self.read();
        let count = seen
            .iter()
            .filter(|v| {
                let v = Some(v.as_str());
                self.cmp_unlocked(&seen, v, version) == Ordering::Greater
                    && self.cmp_unlocked(&seen, v, newest) != Ordering::Greater
            })
            .count();
        count.max(1)
    }

    fn cmp_unlocked(&self, seen: &[String], a: Option<&str>, b: Option<&str>) -> Ordering {
        match (a, b) {
            (Some(a), Some(b)) => match (a.parse::<i64>(), b.parse::<i64>()) {
                (Ok(x), Ok(y)) => x.cmp(&y),
                _ => {
                    let at = |v: &str| seen.iter().position(|s| s == v);
                    at(a).cmp(&at(b))
                }
            },
            (None, None) => Ordering::Equal,
            (None, Some(_)) => Ordering::Less,
            (Some(_), None) => Ordering::Greater,
        }
    }
}

static KEY: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\"weight_version\""));

/// Bytes of a large frame that are searched, at each end: SGLang writes `meta_info` (and the
/// version in it) after the output but may follow it with megabytes of `routed_experts`.
const SCAN_ENDS: usize = 64 * 1024;

/// The `weight_version` string in a worker's answer (or one of its events), if one is there.
/// A SIMD substring search, so answers without one cost next to nothing.
pub fn scan(bytes: &[u8]) -> Option<&str> {
    if bytes.len() > 2 * SCAN_ENDS {
        let tail = bytes.len() - SCAN_ENDS;
        return scan(&bytes[..SCAN_ENDS]).or_else(|| scan(&bytes[tail..]));
    }
    let at = KEY.find(bytes)? + KEY.needle().len();
    let rest = bytes[at..]
        .trim_ascii_start()
        .strip_prefix(b":")?
        .trim_ascii_start();
    let value = rest.strip_prefix(b"\"")?;
    let end = memchr::memchr2(b'"', b'\\', value)?;
    (value[end] == b'"')
        .then(|| std::str::from_utf8(&value[..end]).ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_numbers_numerically_and_names_by_arrival() {
        let v = Versions::default();
        for name in ["10", "9", "beta", "alpha"] {
            v.record(name);
        }
        assert_eq!(v.cmp(Some("9"), Some("10")), Ordering::Less);
        assert_eq!(
            v.cmp(Some("beta"), Some("alpha")),
            Ordering::Less,
            "arrival order"
        );
        assert_eq!(v.cmp(None, Some("9")), Ordering::Less);
        // Steps behind count the versions between, so a run keeps to one kind of name.
        let v = Versions::default();
        for name in ["10", "9"] {
            v.record(name);
        }
        assert_eq!(v.behind(Some("9"), Some("10")), 1);
        assert_eq!(v.behind(Some("10"), Some("10")), 0);
        v.record("11");
        assert_eq!(v.behind(Some("9"), Some("11")), 2);
        assert_eq!(
            v.behind(None, Some("11")),
            3,
            "an unknown version is the oldest"
        );
    }

    #[test]
    fn scans_a_version_out_of_an_answer() {
        let body = br#"{"text":"a","meta_info":{"id":"x","weight_version": "42","e2e":1}}"#;
        assert_eq!(scan(body), Some("42"));
        assert_eq!(scan(br#"{"meta_info":{"weight_version":null}}"#), None);
        assert_eq!(scan(b"data: {\"text\":\"b\"}\n\n"), None);
        let mut big = br#"{"meta_info":{"weight_version":"7","routed_experts":""#.to_vec();
        big.extend(std::iter::repeat_n(b'Q', 300_000));
        big.extend(b"\"}}");
        assert_eq!(scan(&big), Some("7"));
    }
}
