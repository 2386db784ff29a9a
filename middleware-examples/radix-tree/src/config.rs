//! The middleware's config string, e.g. `max_tokens=4000000&keep_versions=3`.

use crate::tree::Config;

/// Above this the cache could outgrow wasm32's 4 GiB address space (~20 bytes per token).
const MAX_TOKENS_LIMIT: usize = 150_000_000;

/// Parses `key=value` pairs joined by `&`; both keys are optional (see [`Config::default`]).
///
/// - `max_tokens`: token budget, 1..=150000000.
/// - `keep_versions`: how many of the newest weight versions to keep; `0` or `none` keeps all.
///
/// Unknown keys and bad values are errors, so that a typo stops the router at startup rather
/// than running a cache configured differently than intended.
pub fn parse(config: &str) -> Result<Config, String> {
    let mut out = Config::default();
    for pair in config.trim().split('&').filter(|p| !p.is_empty()) {
        let Some((key, value)) = pair.split_once('=') else {
            return Err(format!("radix-tree: config `{pair}` is not key=value"));
        };
        match key {
            "max_tokens" => {
                out.max_tokens = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_TOKENS_LIMIT).contains(n))
                    .ok_or_else(|| {
                        format!(
                            "radix-tree: max_tokens must be an integer in 1..={MAX_TOKENS_LIMIT}, got `{value}`"
                        )
                    })?;
            }
            "keep_versions" => {
                out.keep_versions = match value {
                    "none" | "0" => None,
                    v => Some(v.parse().map_err(|_| {
                        format!("radix-tree: keep_versions must be an integer or `none`, got `{v}`")
                    })?),
                };
            }
            other => {
                return Err(format!(
                    "radix-tree: unknown config key `{other}` (known: max_tokens, keep_versions)"
                ));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_keys_and_defaults() {
        assert_eq!(parse(""), Ok(Config::default()));
        let c = parse("max_tokens=1000&keep_versions=none").expect("valid");
        assert_eq!((c.max_tokens, c.keep_versions), (1000, None));
        assert_eq!(parse("keep_versions=0").map(|c| c.keep_versions), Ok(None));
        assert_eq!(
            parse("keep_versions=5").map(|c| c.keep_versions),
            Ok(Some(5))
        );
    }

    #[test]
    fn rejects_bad_config() {
        for bad in [
            "max_token=5",
            "max_tokens",
            "max_tokens=0",
            "max_tokens=-1",
            "max_tokens=999999999999",
            "keep_versions=all",
        ] {
            let err = parse(bad).expect_err(bad);
            assert!(err.starts_with("radix-tree: "), "{err}");
        }
    }
}
