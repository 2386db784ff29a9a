//! Integration tests: the real router and mock workers on loopback ephemeral ports. One
//! binary, so the heavy dependencies link once.

mod admin;
mod builtin;
mod chat;
mod common;
mod control;
mod examples;
mod faults;
mod framing;
mod guests;
mod health;
mod middleware;
mod pd;
mod proxy;
mod radix;
mod radix_fidelity;
mod retries;
mod routing;
mod security;
mod shutdown;
mod slime;
mod streaming;
