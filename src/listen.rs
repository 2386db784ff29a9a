//! The listening sockets: one per serving thread, all bound to the same address with
//! SO_REUSEPORT so the kernel spreads connections over the threads.

use std::net::{SocketAddr, TcpListener, ToSocketAddrs};

use anyhow::{Context as _, anyhow};
use socket2::{Domain, Protocol, Socket, Type};

/// `count` non-blocking listeners on `host:port`; port 0 picks one free port for all.
pub fn bind(host: &str, port: u16, count: usize) -> anyhow::Result<Vec<TcpListener>> {
    let addr = (host, port)
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve listen address {host}"))?
        .next()
        .ok_or_else(|| anyhow!("listen address {host} resolves to nothing"))?;
    // SO_REUSEPORT would let a second router silently share a port with a running one, so
    // first claim the address alone: that fails if anything listens there, and resolves
    // port 0 to the port every thread then shares.
    let exclusive = listen(addr, false).with_context(|| format!("cannot listen on {addr}"))?;
    let addr = exclusive.local_addr()?;
    drop(exclusive);
    (0..count.max(1))
        .map(|_| listen(addr, true).with_context(|| format!("cannot listen on {addr}")))
        .collect()
}

fn listen(addr: SocketAddr, shared: bool) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(shared)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}
