//! The agent's TCP listener under slow, idle and greedy clients: each is cut off or refused by
//! its limit, and a well-behaved client keeps getting answers meanwhile. Runs the real listener
//! with TLS on loopback; the "other machines" are other loopback addresses.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hvnode_agent::listen::{serve_tcp, Limits};
use hvnode_agent::{paths_under, Agent};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Generous: the facts are waited for, this only bounds a failing run.
const DEADLINE: Duration = Duration::from_secs(30);

async fn connect_from(source: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    socket.connect(to).await.unwrap()
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

async fn tls_from(source: &str, to: SocketAddr) -> Tls {
    let verifier = Arc::new(hvnode_tls::PinnedServerVerifier::new(None));
    let config = hvnode_tls::pinned_client_config(verifier, None).unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = rustls::pki_types::ServerName::try_from("node").unwrap();
    connector
        .connect(name, connect_from(source, to).await)
        .await
        .unwrap()
}

/// One request on a new connection; the whole answer.
async fn get(source: &str, to: SocketAddr, path: &str) -> String {
    let mut tls = tls_from(source, to).await;
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    let _ = tls.read_to_end(&mut answer).await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// Waits until the agent closes the connection: a read that ends or fails.
async fn closed_by_agent<S: AsyncReadExt + Unpin>(s: &mut S) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 512];
    loop {
        match tokio::time::timeout(DEADLINE, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return start.elapsed(),
            Ok(Ok(_)) => continue,
            Err(_) => panic!("the agent kept the connection open for {DEADLINE:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_idle_and_greedy_clients_are_cut_off_while_others_are_answered() {
    let root = std::env::temp_dir().join(format!("hvnode-slow-clients-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let agent = Arc::new(Agent::new(paths_under(&root)).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let limits = Limits {
        handshake: Duration::from_secs(1),
        head: Duration::from_secs(1),
        connections: 100,
        per_peer: 3,
    };
    let server = tokio::spawn(serve_tcp(agent, listener, limits));

    // Three idle connections from one address fill its share; they never say anything.
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(connect_from("127.0.0.2", addr).await);
    }
    // A fourth from there is told why it is refused.
    let refused = get("127.0.0.2", addr, "/v1/registration").await;
    assert!(
        refused.starts_with("HTTP/1.1 503") && refused.contains("too_many_connections"),
        "{refused}"
    );
    // Another address is answered meanwhile.
    let answer = get("127.0.0.1", addr, "/v1/registration").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // The idle ones are cut off at the handshake deadline, which frees their address.
    for s in &mut idle {
        let took = closed_by_agent(s).await;
        assert!(took < DEADLINE, "{took:?}");
    }
    let deadline = Instant::now() + DEADLINE;
    loop {
        let again = get("127.0.0.2", addr, "/v1/registration").await;
        if again.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the address stays refused: {again}"
        );
        tokio::task::yield_now().await;
    }

    // A client that completes TLS and then trickles half a request head is cut off too, and so
    // is one that goes quiet on a kept-alive connection after an answer.
    let mut slow = tls_from("127.0.0.3", addr).await;
    slow.write_all(b"GET /v1/registration HTTP/1.1\r\nHost: no")
        .await
        .unwrap();
    closed_by_agent(&mut slow).await;
    let mut quiet = tls_from("127.0.0.4", addr).await;
    quiet
        .write_all(b"GET /v1/registration HTTP/1.1\r\nHost: node\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 12];
    quiet.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    closed_by_agent(&mut quiet).await;

    server.abort();
    let _ = std::fs::remove_dir_all(&root);
}
