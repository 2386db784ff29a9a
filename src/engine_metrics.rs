//! `GET /engine_metrics`: every live worker's own `/metrics`, fetched concurrently, each
//! sample labelled `worker="<url>"`, merged into one exposition with one HELP and TYPE per
//! family, so one Prometheus scrape of the router sees every engine.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use serde_json::json;
use tokio::task::JoinSet;

use crate::app::App;
use crate::body::RouterBody;
use crate::error::{RouterError, json_response};
use crate::worker::Worker;

/// Fetches, relabels and merges; a worker that fails is skipped and counted.
pub async fn serve(app: &App) -> Response<RouterBody> {
    let workers: Vec<Arc<Worker>> = app
        .pool()
        .snapshot()
        .iter()
        .filter(|w| w.is_live())
        .cloned()
        .collect();
    if workers.is_empty() {
        return RouterError::NoLiveWorker.into_response();
    }
    let mut fetches = JoinSet::new();
    for (index, worker) in workers.iter().enumerate() {
        let client = app.engine_client().clone();
        let url = format!("{}/metrics", worker.url());
        fetches.spawn(async move { (index, fetch(&client, &url).await) });
    }
    let mut texts = vec![None; workers.len()];
    let mut errors = Vec::new();
    while let Some(Ok((index, result))) = fetches.join_next().await {
        match result {
            Ok(text) => texts[index] = Some(text),
            Err(error) => {
                let url = workers[index].url();
                tracing::debug!(worker = url, %error, "engine metrics fetch failed");
                app.metrics().engine_metrics_failure(url);
                errors.push(json!({"url": url, "error": error}));
            }
        }
    }
    let mut merged = Merged::default();
    for (worker, text) in workers.iter().zip(&texts) {
        if let Some(text) = text {
            merged.add(worker.url(), text);
        }
    }
    if merged.is_empty() && !errors.is_empty() {
        let error = format!("no worker answered /metrics ({} failed)", errors.len());
        return json_response(
            StatusCode::BAD_GATEWAY,
            &json!({"error": error, "results": errors}),
        );
    }
    let mut response = Response::new(RouterBody::full(Bytes::from(merged.render())));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

async fn fetch(client: &reqwest::Client, url: &str) -> Result<String, String> {
    let response = client.get(url).send().await.map_err(|e| e.to_string())?;
    if !response.status().is_success() {
        return Err(format!("status {}", response.status()));
    }
    response.text().await.map_err(|e| e.to_string())
}

/// Families in first-seen order, each with its HELP, TYPE and samples from every worker.
#[derive(Default)]
struct Merged {
    families: Vec<Family>,
    by_name: HashMap<String, usize>,
}

#[derive(Default)]
struct Family {
    name: String,
    help: Option<String>,
    kind: Option<String>,
    samples: Vec<String>,
}

/// Sample-name suffixes that belong to the family of the name without them.
const SUFFIXES: &[&str] = &["_bucket", "_sum", "_count", "_total", "_created", "_info"];

impl Merged {
    fn is_empty(&self) -> bool {
        self.families.iter().all(|f| f.samples.is_empty())
    }

    fn family(&mut self, name: &str) -> &mut Family {
        let index = match self.by_name.get(name) {
            Some(&index) => index,
            None => {
                self.by_name.insert(name.to_owned(), self.families.len());
                self.families.push(Family {
                    name: name.to_owned(),
                    ..Family::default()
                });
                self.families.len() - 1
            }
        };
        &mut self.families[index]
    }

    /// One worker's exposition: its comments set HELP and TYPE (the first worker's win), its
    /// samples join their family with the worker's label added.
    fn add(&mut self, worker: &str, text: &str) {
        let mut current: Option<String> = None;
        for line in text.lines().map(str::trim_end).filter(|l| !l.is_empty()) {
            if let Some(comment) = line.strip_prefix('#') {
                let mut words = comment.trim_start().splitn(3, ' ');
                let (Some(keyword), Some(name)) = (words.next(), words.next()) else {
                    continue;
                };
                let rest = words.next().unwrap_or_default().to_owned();
                match keyword {
                    "HELP" => {
                        self.family(name).help.get_or_insert(rest);
                    }
                    "TYPE" => {
                        self.family(name).kind.get_or_insert(rest);
                    }
                    _ => continue,
                }
                current = Some(name.to_owned());
                continue;
            }
            let Some(sample) = relabel(line, worker) else {
                continue;
            };
            let name = sample_name(line);
            let family = match &current {
                Some(family) if belongs(name, family) => family.clone(),
                _ => name.to_owned(),
            };
            self.family(&family).samples.push(sample);
        }
    }

    fn render(&self) -> String {
        let mut out = String::new();
        for family in self.families.iter().filter(|f| !f.samples.is_empty()) {
            if let Some(help) = &family.help {
                out.push_str(&format!("# HELP {} {help}\n", family.name));
            }
            if let Some(kind) = &family.kind {
                out.push_str(&format!("# TYPE {} {kind}\n", family.name));
            }
            for sample in &family.samples {
                out.push_str(sample);
                out.push('\n');
            }
        }
        out
    }
}

fn belongs(sample: &str, family: &str) -> bool {
    sample == family
        || sample
            .strip_prefix(family)
            .is_some_and(|suffix| SUFFIXES.contains(&suffix))
}

fn sample_name(line: &str) -> &str {
    let end = line.find(['{', ' ', '\t']).unwrap_or(line.len());
    &line[..end]
}

/// The sample with `worker="<url>"` added to its labels; a label of that name the engine set
/// itself is kept as `exported_worker`, as Prometheus does on such a clash. `None` for a line
/// that is not a sample.
fn relabel(line: &str, worker: &str) -> Option<String> {
    let name = sample_name(line);
    if name.is_empty() {
        return None;
    }
    let rest = &line[name.len()..];
    let ours = format!("worker=\"{worker}\"");
    let Some(labels) = rest.strip_prefix('{') else {
        return Some(format!("{name}{{{ours}}}{rest}"));
    };
    let end = labels_end(labels)?;
    let (inner, value) = (&labels[..end], &labels[end + 1..]);
    let inner = inner.trim().trim_end_matches(',');
    let inner = rename_worker_label(inner);
    Some(if inner.is_empty() {
        format!("{name}{{{ours}}}{value}")
    } else {
        format!("{name}{{{inner},{ours}}}{value}")
    })
}

/// Where the label set's closing brace is, skipping braces inside quoted values.
fn labels_end(labels: &str) -> Option<usize> {
    let (mut quoted, mut escaped) = (false, false);
    for (i, c) in labels.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '}' if !quoted => return Some(i),
            _ => {}
        }
    }
    None
}

fn rename_worker_label(labels: &str) -> String {
    let starts_worker = |s: &str| s.trim_start().starts_with("worker=");
    if !starts_worker(labels) && !labels.contains(",worker=") && !labels.contains(", worker=") {
        return labels.to_owned();
    }
    // Rebuild label by label: a clash is rare, so this path may allocate freely.
    let mut out = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in labels.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(labels[start..i].trim().to_owned());
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(labels[start..].trim().to_owned());
    out.iter()
        .map(|l| match l.strip_prefix("worker=") {
            Some(value) => format!("exported_worker={value}"),
            None => l.clone(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relabels_samples() {
        let w = "http://h:1";
        assert_eq!(relabel("a 1", w).unwrap(), "a{worker=\"http://h:1\"} 1");
        assert_eq!(
            relabel("sglang:x{m=\"q}\",n=\"\"} 2 123", w).unwrap(),
            "sglang:x{m=\"q}\",n=\"\",worker=\"http://h:1\"} 2 123"
        );
        assert_eq!(relabel("b{} 3", w).unwrap(), "b{worker=\"http://h:1\"} 3");
        assert_eq!(
            relabel("c{worker=\"x\",k=\"v\"} 4", w).unwrap(),
            "c{exported_worker=\"x\",k=\"v\",worker=\"http://h:1\"} 4"
        );
    }

    #[test]
    fn merges_families_once() {
        let one = "# HELP g A gauge\n# TYPE g gauge\ng{m=\"a\"} 1\n# HELP h A histogram\n# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_sum 3\nh_count 2\n";
        let two = "# HELP g other help\n# TYPE g gauge\ng{m=\"a\"} 5\nuntyped 7\n";
        let mut merged = Merged::default();
        merged.add("http://a:1", one);
        merged.add("http://b:2", two);
        let text = merged.render();
        assert_eq!(text.matches("# TYPE g gauge").count(), 1, "{text}");
        assert!(text.contains("# HELP g A gauge\n"));
        assert!(
            text.contains(
                "g{m=\"a\",worker=\"http://a:1\"} 1\ng{m=\"a\",worker=\"http://b:2\"} 5\n"
            )
        );
        assert!(text.contains("# TYPE h histogram\nh_bucket{le=\"1\",worker=\"http://a:1\"} 2\nh_sum{worker=\"http://a:1\"} 3\n"));
        assert!(text.contains("untyped{worker=\"http://b:2\"} 7"));
    }
}
