//! `hvnode-agent`: serves the node API on TCP (HTTPS, mutual TLS once registered) and on a
//! root-only unix socket (plain HTTP).

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use hvnode_agent::listen::{self, Limits};
use hvnode_agent::{Agent, Paths};
use tokio::net::{TcpListener, UnixListener};

const USAGE: &str = "usage: hvnode-agent [--listen ADDR:PORT] [--socket PATH] [--data-dir DIR] \
[--run-dir DIR] [--images-dir DIR] [--init-socket PATH] [--node-log PATH] [--vmm-binary PATH] \
[--release-keys DIR]";

struct Args {
    listen: SocketAddr,
    socket: PathBuf,
    paths: Paths,
}

fn parse_args() -> Result<Args, String> {
    use hvnode_api::paths as p;
    let mut listen: SocketAddr = "0.0.0.0:8443".parse().map_err(|e| format!("{e}"))?;
    let mut socket = PathBuf::from(p::AGENT_SOCKET);
    let mut paths = Paths {
        data: p::DATA_DIR.into(),
        run: p::RUN_DIR.into(),
        images: p::IMAGES_DIR.into(),
        init_socket: p::INIT_SOCKET.into(),
        node_log: p::NODE_LOG.into(),
        vmm: p::VMM_BINARY.into(),
        release_keys: p::RELEASE_KEYS_DIR.into(),
        cmdline: "/proc/cmdline".into(),
        system_disk: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--help" || flag == "-h" {
            return Err(USAGE.to_owned());
        }
        let value = it
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        match flag.as_str() {
            "--listen" => {
                listen = value
                    .parse()
                    .map_err(|e| format!("--listen {value}: {e}"))?
            }
            "--socket" => socket = value.into(),
            "--data-dir" => paths.data = value.into(),
            "--run-dir" => paths.run = value.into(),
            "--images-dir" => paths.images = value.into(),
            "--init-socket" => paths.init_socket = value.into(),
            "--node-log" => paths.node_log = value.into(),
            "--vmm-binary" => paths.vmm = value.into(),
            "--release-keys" => paths.release_keys = value.into(),
            other => return Err(format!("unknown option {other}\n{USAGE}")),
        }
    }
    Ok(Args {
        listen,
        socket,
        paths,
    })
}

async fn run(args: Args) -> Result<(), String> {
    let agent = Arc::new(Agent::new(args.paths.clone()).map_err(|e| hvnode_api::error::chain(&e))?);
    let tcp = TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("listening on {}: {e}", args.listen))?;
    if let Some(dir) = args.socket.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let _ = std::fs::remove_file(&args.socket);
    let unix = UnixListener::bind(&args.socket)
        .map_err(|e| format!("listening on {}: {e}", args.socket.display()))?;
    std::fs::set_permissions(&args.socket, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("{}: {e}", args.socket.display()))?;
    eprintln!(
        "agent: hvnode {} serving https://{} and {}; node certificate {}",
        hvnode_api::VERSION,
        args.listen,
        args.socket.display(),
        agent.fingerprint()
    );
    agent.resume_pending();
    agent.resume_network_rollback();
    // Before serving, so that the first answers already know the guests that kept running.
    let starter = Arc::clone(&agent);
    tokio::task::spawn_blocking(move || starter.start_guests())
        .await
        .map_err(|e| format!("taking over guests: {e}"))?;
    agent.spawn_cluster();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("SIGTERM handler: {e}"))?;
    tokio::select! {
        _ = listen::serve_tcp(Arc::clone(&agent), tcp, Limits::default()) => {}
        _ = listen::serve_unix(Arc::clone(&agent), unix, Limits::default()) => {}
        _ = term.recv() => eprintln!("agent: SIGTERM, exiting (guests keep running)"),
    }
    let _ = std::fs::remove_file(&args.socket);
    Ok(())
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("{msg}");
            std::process::exit(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hvnode-agent: tokio runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(msg) = rt.block_on(run(args)) {
        eprintln!("hvnode-agent: {msg}");
        std::process::exit(1);
    }
}
