//! Worker selection: least in-flight with random ties, taking and releasing the guard.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use slime_router::metrics::Metrics;
use slime_router::policy::{RouteHint, Routing};
use slime_router::pool::Pool;
use slime_router::worker::{Role, Tried, WorkerType, WorkerUrl};

fn pool(workers: u16) -> Pool {
    let pool = Pool::new(Arc::new(Metrics::new()));
    for port in 0..workers {
        if let Ok(url) = WorkerUrl::parse(&format!("http://127.0.0.1:{}", 20000 + port)) {
            let _ = pool.add(url, WorkerType::Regular);
        }
    }
    pool
}

fn selection(c: &mut Criterion) {
    for workers in [4u16, 64] {
        let pool = pool(workers);
        // Some load, so the scan has minima and ties to resolve.
        let held: Vec<_> = (0..workers / 2)
            .filter_map(|_| {
                pool.pick(&Routing::none(), None, &Tried::default(), Role::Regular)
                    .ok()
            })
            .collect();
        c.bench_function(&format!("pool_pick_release/{workers}_workers"), |b| {
            b.iter(|| {
                black_box(pool.pick(&Routing::none(), None, &Tried::default(), Role::Regular))
            })
        });
        let hint = RouteHint::Prefer(format!("http://127.0.0.1:{}", 20000 + workers - 1));
        c.bench_function(&format!("pool_pick_prefer/{workers}_workers"), |b| {
            b.iter(|| {
                black_box(pool.pick(
                    &Routing::none(),
                    Some(&hint),
                    &Tried::default(),
                    Role::Regular,
                ))
            })
        });
        drop(held);
    }
}

/// A request's last pick after every other worker failed for it: the tried set must cost
/// O(1) per candidate, so this stays linear in the workers.
fn after_failures(c: &mut Criterion) {
    let workers = 10_000u16;
    let pool = pool(workers);
    let mut tried = Tried::new();
    for worker in pool.snapshot().iter().take(usize::from(workers) - 1) {
        tried.insert(worker);
    }
    c.bench_function("pool_pick_after_failures/10000_workers_9999_tried", |b| {
        b.iter(|| black_box(pool.pick(&Routing::none(), None, &tried, Role::Regular)))
    });
}

criterion_group!(benches, selection, after_failures);
criterion_main!(benches);
