//! `hostile`: a test guest that misbehaves on purpose, so that tests can check the host's
//! deadlines, memory cap, trap handling and sandbox.
//!
//! Config: `mode=loop|membomb|trap|sandbox|init-error|slow|sleep` (required),
//! `at=request|response|chunk|handle|init` (default `request`), `fail=open|closed` (default
//! closed), `ms=<n>` (for `slow`, which spins, and `sleep`, which blocks on the WASI clock;
//! default 100), `every=<n>` (in `on-request`, only requests whose id is a multiple of n;
//! default 1), `name=<s>` (default `hostile`).
//!
//! Only the hook named by `at` misbehaves; every other hook is a no-op. With `at=handle` or
//! `mode=sandbox` it serves `GET /hostile/sandbox`.

wit_bindgen::generate!({
    path: "../../../wit",
    world: "middleware",
    additional_type_attributes: {
        "slime:router/types@0.1.0/request-patch": [#[derive(Default)]],
        "slime:router/types@0.1.0/response-patch": [#[derive(Default)]],
    },
});

use std::hint::black_box;
use std::io::Write;
use std::sync::OnceLock;

use exports::slime::router::handler::Guest;
use serde_json::json;
use slime::router::host;
use slime::router::types::{
    BodyEdit, ChunkAction, ChunkResult, FailureMode, Hooks, Manifest, Reply, Request,
    RequestAction, RequestPatch, Response, ResponsePatch, Route,
};

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Loop,
    MemBomb,
    Trap,
    Sandbox,
    InitError,
    Slow,
    Sleep,
}

#[derive(Clone, Copy, PartialEq)]
enum At {
    Request,
    Response,
    Chunk,
    Handle,
    Init,
}

#[derive(Clone, PartialEq)]
struct Config {
    mode: Mode,
    at: At,
    fail_open: bool,
    ms: u64,
    /// Misbehave in `on-request` only for requests whose id is a multiple of this (1: all).
    every: u64,
    name: String,
}

static CONFIG: OnceLock<Config> = OnceLock::new();

const ROUTE: &str = "/hostile/sandbox";

fn parse(config: &str) -> Result<Config, String> {
    let mut mode = None;
    let mut c = Config {
        mode: Mode::Trap,
        at: At::Request,
        fail_open: false,
        ms: 100,
        every: 1,
        name: "hostile".into(),
    };
    for pair in config.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let bad = || format!("hostile: bad config `{pair}`");
        match key {
            "mode" => {
                mode = Some(match value {
                    "loop" => Mode::Loop,
                    "membomb" => Mode::MemBomb,
                    "trap" => Mode::Trap,
                    "sandbox" => Mode::Sandbox,
                    "init-error" => Mode::InitError,
                    "slow" => Mode::Slow,
                    "sleep" => Mode::Sleep,
                    _ => return Err(bad()),
                });
            }
            "at" => {
                c.at = match value {
                    "request" => At::Request,
                    "response" => At::Response,
                    "chunk" => At::Chunk,
                    "handle" => At::Handle,
                    "init" => At::Init,
                    _ => return Err(bad()),
                };
            }
            "fail" => {
                c.fail_open = match value {
                    "open" => true,
                    "closed" => false,
                    _ => return Err(bad()),
                };
            }
            "ms" => c.ms = value.parse().map_err(|_| bad())?,
            "every" => c.every = value.parse().ok().filter(|&n| n > 0).ok_or_else(bad)?,
            "name" => c.name = value.into(),
            _ => return Err(format!("hostile: unknown config key `{key}`")),
        }
    }
    c.mode =
        mode.ok_or("hostile: mode=loop|membomb|trap|sandbox|init-error|slow|sleep is required")?;
    Ok(c)
}

/// Misbehaves per `mode` if `at` is where this call is; returns the sandbox report, if any.
fn misbehave(here: At) -> Option<serde_json::Value> {
    let c = CONFIG.get()?;
    if c.at != here {
        return None;
    }
    match c.mode {
        Mode::Loop => spin_forever(),
        Mode::MemBomb => membomb(),
        Mode::Trap => panic!("hostile: trap on purpose"),
        Mode::Slow => {
            slow(c.ms);
            None
        }
        Mode::Sleep => {
            // Suspends on `monotonic-clock.subscribe-duration`, using no CPU time.
            std::thread::sleep(std::time::Duration::from_millis(c.ms));
            None
        }
        Mode::Sandbox => Some(sandbox()),
        Mode::InitError => None,
    }
}

fn spin_forever() -> ! {
    // black_box keeps the optimiser from proving the loop has no effect and deleting it.
    let mut i = 0u64;
    loop {
        i = black_box(i.wrapping_add(1));
    }
}

fn membomb() -> ! {
    const BLOCK: usize = 1 << 20;
    let mut blocks: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut block = Vec::new();
        if block.try_reserve_exact(BLOCK).is_err() || blocks.try_reserve(1).is_err() {
            // A guest using plain `Vec::push` aborts here through `handle_alloc_error`; do the
            // same explicitly, in case the host's cap only makes `memory.grow` fail.
            std::process::abort();
        }
        // Write every 4 KiB page so the memory is really committed, not just reserved.
        block.resize(BLOCK, 0);
        for page in block.iter_mut().step_by(4096) {
            *page = 1;
        }
        blocks.push(black_box(block));
    }
}

fn slow(ms: u64) {
    let end = host::now_ns().saturating_add(ms.saturating_mul(1_000_000));
    while host::now_ns() < end {
        black_box(());
    }
}

fn ok_or_err<T>(what: &str, r: std::io::Result<T>) -> &'static str {
    match r {
        Ok(_) => "ok",
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "hostile: {what}: {e}");
            "err"
        }
    }
}

/// Tries everything the sandbox should deny and reports what happened.
fn sandbox() -> serde_json::Value {
    let file = ok_or_err("read /etc/passwd", std::fs::read("/etc/passwd"));
    let dir = ok_or_err("read_dir /", std::fs::read_dir("/"));
    let env = std::env::vars_os().count();
    let args = std::env::args_os().count();
    let tcp = ok_or_err(
        "connect 127.0.0.1:1",
        std::net::TcpStream::connect("127.0.0.1:1"),
    );
    // `println!` panics when stdout is closed; a failed write is not what this mode tests.
    let _ = writeln!(std::io::stdout(), "hostile: hello from stdout");
    let _ = writeln!(std::io::stderr(), "hostile: hello from stderr");
    json!({ "file": file, "dir": dir, "env": env, "args": args, "tcp": tcp })
}

fn json_bytes(report: &serde_json::Value) -> Vec<u8> {
    report.to_string().into_bytes()
}

fn content_type_json() -> (String, Vec<u8>) {
    ("content-type".into(), b"application/json".to_vec())
}

struct Hostile;

impl Guest for Hostile {
    fn init(config: String) -> Result<Manifest, String> {
        let c = parse(&config)?;
        if c.mode == Mode::InitError {
            return Err("hostile init error".into());
        }
        if *CONFIG.get_or_init(|| c.clone()) != c {
            return Err("hostile: init called again with a different config".into());
        }
        if let Some(report) = misbehave(At::Init) {
            host::log(
                host::Level::Info,
                &format!("hostile sandbox at init: {report}"),
            );
        }
        let mut hooks = Hooks::REQUEST;
        match c.at {
            At::Response => hooks |= Hooks::RESPONSE,
            At::Chunk => hooks |= Hooks::RESPONSE_CHUNKS,
            At::Request | At::Handle | At::Init => {}
        }
        let routes = if c.at == At::Handle || c.mode == Mode::Sandbox {
            vec![Route {
                method: "GET".into(),
                path: ROUTE.into(),
            }]
        } else {
            Vec::new()
        };
        Ok(Manifest {
            name: c.name,
            hooks,
            paths: Vec::new(),
            routes,
            response_fields: Vec::new(),
            on_failure: if c.fail_open {
                FailureMode::FailOpen
            } else {
                FailureMode::FailClosed
            },
            stateful: false,
        })
    }

    fn on_request(req: Request) -> RequestAction {
        let every = CONFIG.get().map_or(1, |c| c.every);
        if !req.id.is_multiple_of(every) {
            return RequestAction::Continue(RequestPatch::default());
        }
        match misbehave(At::Request) {
            Some(report) => RequestAction::Respond(Reply {
                status: 200,
                headers: vec![content_type_json()],
                body: json_bytes(&report),
            }),
            None => RequestAction::Continue(RequestPatch::default()),
        }
    }

    fn on_response(_req: Request, _resp: Response, _stash: Option<Vec<u8>>) -> ResponsePatch {
        match misbehave(At::Response) {
            Some(report) => ResponsePatch {
                set_headers: vec![content_type_json()],
                body: Some(BodyEdit::Replace(json_bytes(&report))),
                ..Default::default()
            },
            None => ResponsePatch::default(),
        }
    }

    fn on_response_chunk(
        _id: u64,
        _events: Vec<u8>,
        _last: bool,
        _stash: Option<Vec<u8>>,
    ) -> ChunkResult {
        let action = match misbehave(At::Chunk) {
            Some(report) => ChunkAction::Replace(format!("data: {report}\n\n").into_bytes()),
            None => ChunkAction::Pass,
        };
        ChunkResult {
            action,
            stash: None,
        }
    }

    fn handle(_req: Request) -> Reply {
        // The route exists for `at=handle` (misbehave here) and for `mode=sandbox` with any
        // `at` (always run the sandbox probes, so the route never answers an empty report).
        let report = misbehave(At::Handle).or_else(|| {
            let sandbox_mode = CONFIG.get().is_some_and(|c| c.mode == Mode::Sandbox);
            sandbox_mode.then(sandbox)
        });
        Reply {
            status: 200,
            headers: vec![content_type_json()],
            body: json_bytes(&report.unwrap_or_else(|| json!({}))),
        }
    }
}

export!(Hostile);
