//! Load client for the node agent: N keep-alive HTTP/1.1 connections with mutual TLS,
//! each issuing `GET <path>` back to back for a fixed time; prints requests per second,
//! median and 99th-percentile latency, and the error count.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Empty};
use hvnode_api::fingerprint;
use hvnodectl::client::{ClientError, NodeClient, ReqBody};
use hvnodectl::state::{self, Identity, StateDir, StateError};
use hyper::Method;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

/// Command line.
#[derive(Debug, Parser)]
#[command(name = "hvnode-bench-agent-load")]
struct Args {
    /// Agent URL, https://127.0.0.1:PORT.
    #[arg(long)]
    url: String,
    /// hvnodectl state directory with the node registered at --url.
    #[arg(long, conflicts_with_all = ["ca", "cert", "key"])]
    state_dir: Option<PathBuf>,
    /// PEM of the node certificate (pinned by fingerprint), instead of --state-dir.
    #[arg(long, requires_all = ["cert", "key"])]
    ca: Option<PathBuf>,
    /// PEM of the client certificate.
    #[arg(long)]
    cert: Option<PathBuf>,
    /// PEM of the client key.
    #[arg(long)]
    key: Option<PathBuf>,
    /// Concurrent keep-alive connections.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Seconds to run.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Path to request.
    #[arg(long, default_value = "/v1/node")]
    path: String,
}

/// Errors of the benchmark.
#[derive(Debug, thiserror::Error)]
enum BenchError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("No node with URL {0} in the state directory: register it with hvnodectl first")]
    NoNode(String),
    #[error("Give --state-dir, or --ca, --cert and --key")]
    NoCredentials,
    #[error("Cannot read the node certificate {0}")]
    NodeCert(PathBuf),
    #[error("Every request failed ({0} errors); is the agent running and the node registered?")]
    AllFailed(u64),
    #[error("Cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
}

/// Builds the client: pinned node certificate and client identity.
fn make_client(args: &Args) -> Result<NodeClient, BenchError> {
    let url = args.url.trim_end_matches('/');
    let (fp, identity): (String, Identity) = if let Some(dir) = &args.state_dir {
        let st = StateDir::new(dir);
        let nodes = st.load_nodes()?;
        let entry = nodes
            .nodes
            .values()
            .find(|e| e.url.trim_end_matches('/') == url)
            .ok_or_else(|| BenchError::NoNode(url.to_owned()))?;
        (entry.fingerprint.clone(), st.client_identity()?)
    } else if let (Some(ca), Some(cert), Some(key)) = (&args.ca, &args.cert, &args.key) {
        let pem = std::fs::read(ca).map_err(|_| BenchError::NodeCert(ca.clone()))?;
        let der =
            CertificateDer::from_pem_slice(&pem).map_err(|_| BenchError::NodeCert(ca.clone()))?;
        (fingerprint::of_der(&der), state::load_identity(cert, key)?)
    } else {
        return Err(BenchError::NoCredentials);
    };
    Ok(NodeClient::new("bench", url, Some(fp), Some(identity))?)
}

/// One connection's loop: send, read the whole answer, record the latency in µs.
async fn worker(
    client: NodeClient,
    path: String,
    deadline: Instant,
    errors: Arc<AtomicU64>,
) -> Vec<u32> {
    let mut latencies = Vec::with_capacity(64 * 1024);
    let mut sender = None;
    while Instant::now() < deadline {
        let s = match sender.as_mut() {
            Some(s) => s,
            None => match client.connect().await {
                Ok(s) => sender.insert(s),
                Err(_) => {
                    errors.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let body: ReqBody = Empty::<Bytes>::new()
            .map_err(|never| match never {})
            .boxed();
        let req = client.request(Method::GET, &path, body);
        let start = Instant::now();
        let ok = match s.send_request(req).await {
            Ok(resp) => {
                let good = resp.status().is_success();
                good && resp.into_body().collect().await.is_ok()
            }
            Err(_) => false,
        };
        if ok {
            latencies.push(start.elapsed().as_micros().min(u32::MAX as u128) as u32);
        } else {
            errors.fetch_add(1, Ordering::Relaxed);
            sender = None;
        }
    }
    latencies
}

fn percentile_ms(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[idx.min(sorted.len() - 1)]) / 1000.0
}

async fn run(args: Args) -> Result<(), BenchError> {
    let client = make_client(&args)?;
    // Fail fast with the real message when the node cannot be used at all.
    client.call(Method::GET, &args.path, None, "").await?;
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + Duration::from_secs(args.duration);
    let tasks: Vec<_> = (0..args.connections.max(1))
        .map(|_| {
            tokio::spawn(worker(
                client.clone(),
                args.path.clone(),
                deadline,
                errors.clone(),
            ))
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        if let Ok(l) = t.await {
            all.extend(l);
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.sort_unstable();
    let errors = errors.load(Ordering::Relaxed);
    if all.is_empty() {
        return Err(BenchError::AllFailed(errors));
    }
    println!("agent_requests: {}", all.len());
    println!("agent_rps: {:.0}", all.len() as f64 / elapsed);
    println!("agent_p50_ms: {:.3}", percentile_ms(&all, 0.50));
    println!("agent_p99_ms: {:.3}", percentile_ms(&all, 0.99));
    println!("agent_errors: {errors}");
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let result = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .map_err(BenchError::Runtime)
        .and_then(|rt| rt.block_on(run(args)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut text = format!("error: {e}");
            let mut src = std::error::Error::source(&e);
            while let Some(c) = src {
                text.push_str(&format!(": {c}"));
                src = c.source();
            }
            eprintln!("{text}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_the_nearest_rank() {
        let v: Vec<u32> = (1..=100).map(|i| i * 1000).collect();
        assert_eq!(percentile_ms(&v, 0.50), 51.0);
        assert_eq!(percentile_ms(&v, 0.99), 99.0);
        assert_eq!(percentile_ms(&[], 0.99), 0.0);
    }

    #[test]
    fn requires_credentials() {
        let args = Args::try_parse_from(["x", "--url", "https://127.0.0.1:1"]).unwrap();
        assert!(matches!(make_client(&args), Err(BenchError::NoCredentials)));
        assert!(Args::try_parse_from(["x", "--url", "u", "--ca", "a"]).is_err());
    }
}
