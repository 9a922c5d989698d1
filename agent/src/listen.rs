//! Accepting connections: the TCP listener (TLS, then HTTP) and the local socket, each held to
//! [`Limits`]: a deadline for the TLS handshake and for every request head (which also bounds a
//! keep-alive connection's idle time), a cap on connections in all and per peer address. A client
//! that is too slow is disconnected; one over a cap gets `503 too_many_connections` and the
//! connection is closed, so that no client, slow or greedy, keeps the agent from answering the
//! others.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hvnode_api::error::ErrorCode;
use tokio::net::{TcpListener, UnixListener};

use crate::error::Error;
use crate::{Agent, Origin};

/// What one client may take of the agent.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Time for the TLS handshake.
    pub handshake: Duration,
    /// Time for each request head, counted from the connection's start or the end of the
    /// previous answer: also the longest a keep-alive connection may sit idle.
    pub head: Duration,
    /// TCP connections open at once.
    pub connections: usize,
    /// TCP connections open at once from one address.
    pub per_peer: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            handshake: Duration::from_secs(10),
            head: Duration::from_secs(30),
            connections: 512,
            per_peer: 64,
        }
    }
}

/// Open TCP connections, in all and per address.
#[derive(Debug, Default)]
struct Count {
    total: usize,
    by_peer: HashMap<IpAddr, usize>,
}

/// A connection counted in [`Count`] until it is dropped.
#[derive(Debug)]
struct Slot {
    count: Arc<Mutex<Count>>,
    peer: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.count.lock().unwrap_or_else(|e| e.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.by_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                c.by_peer.remove(&self.peer);
            }
        }
    }
}

/// Counts a new connection from `peer`, or says which cap it is over.
fn admit(count: &Arc<Mutex<Count>>, peer: IpAddr, limits: &Limits) -> Result<Slot, String> {
    let mut c = count.lock().unwrap_or_else(|e| e.into_inner());
    let mine = c.by_peer.get(&peer).copied().unwrap_or(0);
    if c.total >= limits.connections {
        return Err(format!(
            "The node has {} connections open, its limit: try again later",
            c.total
        ));
    }
    if mine >= limits.per_peer {
        return Err(format!(
            "{peer} has {mine} connections open, the limit per address: close some and retry"
        ));
    }
    c.total += 1;
    *c.by_peer.entry(peer).or_default() += 1;
    Ok(Slot {
        count: Arc::clone(count),
        peer,
    })
}

/// Serves the TCP listener: TLS with the registration's configuration, then the API.
pub async fn serve_tcp(agent: Arc<Agent>, listener: TcpListener, limits: Limits) {
    let count = Arc::new(Mutex::new(Count::default()));
    loop {
        let Ok((tcp, peer)) = listener.accept().await else {
            continue;
        };
        // Small request/response exchanges: no Nagle delay behind the previous answer.
        let _ = tcp.set_nodelay(true);
        let slot = admit(&count, peer.ip(), &limits);
        let agent = Arc::clone(&agent);
        tokio::spawn(async move {
            let (config, generation) = agent.tls_config();
            let acceptor = tokio_rustls::TlsAcceptor::from(config);
            let tls = match tokio::time::timeout(limits.handshake, acceptor.accept(tcp)).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    eprintln!("agent: TLS handshake with {peer} failed: {e}");
                    return;
                }
                Err(_) => {
                    eprintln!(
                        "agent: {peer} did not complete the TLS handshake within {} s",
                        limits.handshake.as_secs()
                    );
                    return;
                }
            };
            let _slot = match slot {
                Ok(s) => s,
                Err(why) => {
                    eprintln!("agent: refusing a connection from {peer}: {why}");
                    let refusal = Error::new(ErrorCode::TooManyConnections, why);
                    crate::http::refuse_connection(tls, refusal).await;
                    return;
                }
            };
            // rustls has verified any presented certificate against the manager CA of this
            // generation; a connection without one is anonymous.
            let peer = tls.get_ref().1.peer_certificates();
            let client_generation = peer.map(|_| generation);
            let node_peer = peer
                .and_then(|c| c.first())
                .is_some_and(|c| crate::tls::is_node_certificate(c));
            let origin = Origin::Tcp {
                client_generation,
                node_peer,
            };
            agent.serve_connection(tls, origin, limits.head).await;
        });
    }
}

/// Serves the local socket (root only, by its mode).
pub async fn serve_unix(agent: Arc<Agent>, listener: UnixListener, limits: Limits) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(Arc::clone(&agent).serve_connection(stream, Origin::Local, limits.head));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_count_per_address_and_in_all_and_free_on_drop() {
        let count = Arc::new(Mutex::new(Count::default()));
        let limits = Limits {
            connections: 3,
            per_peer: 2,
            ..Limits::default()
        };
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let a1 = admit(&count, a, &limits).unwrap();
        let _a2 = admit(&count, a, &limits).unwrap();
        assert!(admit(&count, a, &limits)
            .unwrap_err()
            .contains("per address"));
        let _b1 = admit(&count, b, &limits).unwrap();
        assert!(admit(&count, b, &limits).unwrap_err().contains("limit"));
        drop(a1);
        assert!(admit(&count, b, &limits).is_ok());
    }
}
