use std::process::ExitCode;

use clap::Parser;
use slime_router::middleware::builtin;
use slime_router::{Config, RunningRouter};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let config = Config::parse();
    if config.list_middleware {
        for name in builtin::names() {
            println!("{name}");
        }
        return ExitCode::SUCCESS;
    }
    init_logging(&config);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("slime-router: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, whatever the causes print (wasm parse errors span several).
            let message = format!("{e:#}")
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ");
            eprintln!("slime-router: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let router = RunningRouter::start(&config).await?;
    tracing::info!(
        addr = %router.addr(),
        workers = config.worker_urls.len(),
        middleware = config.slime_router_middleware_paths.len(),
        "slime-router listening"
    );
    shutdown_signal().await?;
    tracing::info!("shutting down: draining in-flight requests");
    router.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate())?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result?,
        _ = terminate.recv() => {}
    }
    Ok(())
}

fn init_logging(config: &Config) {
    let filter = match (&config.log_level, config.verbose) {
        (Some(level), _) => EnvFilter::new(level),
        (None, true) => EnvFilter::new("debug"),
        (None, false) => {
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"))
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .init();
}
