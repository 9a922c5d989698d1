//! Live migration of a payload guest between two `hvnode-vmm` processes on the host's /dev/kvm
//! (release build), the stream relayed over TLS on loopback as the agents relay it node to
//! node. Guests of 256 MiB, 1 GiB and 4 GiB (two memory slots), each idle (it counts in memory
//! and prints the count), busy (it also dirties 64 MiB/s, paced by the TSC, over a 128 MiB
//! area: the busy guest) and hot (it rewrites a 16 MiB working set as fast as it can,
//! which shows where pre-copy stops converging). Prints, per case, medians over RUNS (or
//! `HVNODE_BENCH_RUNS`): total time, downtime and its parts, passes, bytes sent, throughput, and
//! the dirty rate the source measured; and every run's downtime. The downtime limit is the VMM's default
//! unless `HVNODE_BENCH_DOWNTIME_MS` sets one; `HVNODE_BENCH_KINDS` (`busy,hot`, say) runs only
//! those kinds of guest.
#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hvnode_api::vmm::{MigrationStatus, VmmRequest, VmmResponse};
use hvnode_bench_common::{ask, median, vmm_binary, wait, Vmm};
use hvnode_vmm::payload::{elf64, DIRTIER, MEMORY_COUNTER, PACED_DIRTIER};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

const RUNS: usize = 3;
/// How long a step may take (a 4 GiB busy migration included).
const LIMIT: Duration = Duration::from_secs(300);
const SIZES_MIB: [u64; 3] = [256, 1024, 4096];

fn config(dir: &Path, run: &str, kernel: &Path, mib: u64) -> PathBuf {
    let path = dir.join(format!("{run}.json"));
    let c = serde_json::json!({
        "name": run, "vcpus": 1, "memory_mib": mib, "kernel": kernel,
        "serial_log": dir.join(format!("{run}.log")),
        "control_socket": dir.join(format!("{run}.sock")),
    });
    std::fs::write(&path, c.to_string()).expect("write config");
    path
}

fn start(vmm: &Path, config: &Path, incoming: Option<&Path>) -> Vmm {
    let mut cmd = Command::new(vmm);
    cmd.arg("--config").arg(config);
    if let Some(s) = incoming {
        cmd.arg("--incoming").arg(s);
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(config.with_extension("stderr"))
        .expect("stderr file");
    Vmm(cmd
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .expect("start hvnode-vmm"))
}

/// A TLS server on loopback that relays its one connection to the destination's incoming
/// socket, and a TLS client that relays the source's stream to it: the agents' relay, without
/// HTTP around it.
fn tls_relay(source: UnixStream, incoming: &Path) {
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
        .and_then(|p| p.self_signed(&key))
        .expect("cert");
    let cert_der = CertificateDer::from(cert.der().to_vec());
    let fp = hvnode_api::fingerprint::of_der(&cert_der);
    let server_cfg = rustls::ServerConfig::builder_with_provider(hvnode_tls::provider())
        .with_safe_default_protocol_versions()
        .and_then(|b| {
            b.with_no_client_auth().with_single_cert(
                vec![cert_der],
                PrivateKeyDer::try_from(key.serialize_der()).expect("key der"),
            )
        })
        .expect("server config");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let incoming = incoming.to_owned();
    std::thread::spawn(move || {
        let (tcp, _) = listener.accept().expect("accept");
        tcp.set_nodelay(true).ok();
        let conn = rustls::ServerConnection::new(Arc::new(server_cfg)).expect("tls");
        let tls = rustls::StreamOwned::new(conn, tcp);
        // The socket file appears at bind(), a moment before listen(): refused until then.
        let deadline = Instant::now() + Duration::from_secs(10);
        let dest = loop {
            match UnixStream::connect(&incoming) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => panic!("incoming: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        };
        relay_tls(tls, dest);
    });
    let verifier = Arc::new(hvnode_tls::PinnedServerVerifier::new(Some(fp)));
    let client_cfg = hvnode_tls::pinned_client_config(verifier, None).expect("client config");
    let tcp = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    tcp.set_nodelay(true).ok();
    let conn = rustls::ClientConnection::new(
        Arc::new(client_cfg),
        ServerName::try_from("localhost").expect("name"),
    )
    .expect("tls");
    let tls = rustls::StreamOwned::new(conn, tcp);
    std::thread::spawn(move || relay_tls(tls, source));
}

/// Both directions between a TLS stream and a unix stream, on one thread that polls both
/// sockets, until both sides have closed.
fn relay_tls<C, S>(mut tls: rustls::StreamOwned<C, TcpStream>, mut local: UnixStream)
where
    C: std::ops::DerefMut<Target = rustls::ConnectionCommon<S>>,
    S: rustls::SideData,
{
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let mut buf = vec![0u8; 256 << 10];
    let (mut local_open, mut peer_open) = (true, true);
    while local_open || peer_open {
        let flag = |open: bool| {
            if open {
                PollFlags::POLLIN
            } else {
                PollFlags::empty()
            }
        };
        let (local_ready, peer_ready) = {
            let mut fds = [
                PollFd::new(local.as_fd(), flag(local_open)),
                PollFd::new(tls.sock.as_fd(), flag(peer_open)),
            ];
            if poll(&mut fds, PollTimeout::from(1000u16)).is_err() {
                break;
            }
            let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
            (ready(&fds[0]), ready(&fds[1]))
        };
        if local_ready {
            match local.read(&mut buf) {
                Ok(0) | Err(_) => {
                    local_open = false;
                    tls.conn.send_close_notify();
                    let _ = tls.flush();
                }
                Ok(n) => {
                    if tls.write_all(&buf[..n]).and_then(|()| tls.flush()).is_err() {
                        break;
                    }
                }
            }
        }
        if peer_ready {
            match tls.conn.read_tls(&mut tls.sock) {
                Ok(0) | Err(_) => peer_open = false,
                Ok(_) => {
                    if tls.conn.process_new_packets().is_err() {
                        break;
                    }
                    // Handshake messages and alerts the other side waits for.
                    while tls.conn.wants_write() {
                        if tls.conn.write_tls(&mut tls.sock).is_err() {
                            peer_open = false;
                            break;
                        }
                    }
                    loop {
                        match tls.conn.reader().read(&mut buf) {
                            Ok(0) => {
                                peer_open = false;
                                break;
                            }
                            Ok(n) => {
                                if local.write_all(&buf[..n]).is_err() {
                                    peer_open = false;
                                    break;
                                }
                            }
                            Err(_) => break,
                        }
                    }
                }
            }
            if !peer_open {
                let _ = local.shutdown(std::net::Shutdown::Write);
            }
        }
    }
}

fn status(sock: &Path) -> Option<MigrationStatus> {
    match ask(sock, &VmmRequest::MigrateStatus)? {
        VmmResponse::Migration { migration } => Some(migration),
        _ => None,
    }
}

fn main() {
    let vmm = vmm_binary();
    let dir = std::env::temp_dir().join(format!("hvnode-bench-migrate-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let kinds: [(&str, &[u8]); 3] = [
        ("idle", &MEMORY_COUNTER),
        ("busy", &PACED_DIRTIER),
        ("hot", &DIRTIER),
    ];
    let kinds = kinds.map(|(kind, code)| {
        let kernel = dir.join(format!("{kind}.elf"));
        std::fs::write(&kernel, elf64(code)).expect("payload");
        (kind, kernel)
    });
    let only = std::env::var("HVNODE_BENCH_KINDS").ok();
    let runs = std::env::var("HVNODE_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(RUNS);
    for mib in SIZES_MIB {
        for (kind, kernel) in &kinds {
            if only
                .as_deref()
                .is_some_and(|k| !k.split(',').any(|k| k == *kind))
            {
                continue;
            }
            let mut figures: Vec<Vec<f64>> = vec![Vec::new(); 9];
            for run in 0..runs {
                let src_cfg = config(&dir, "src", kernel, mib);
                let dst_cfg = config(&dir, "dst", kernel, mib);
                let (src_sock, dst_sock) = (dir.join("src.sock"), dir.join("dst.sock"));
                let incoming = dir.join("dst.in");
                let _src = start(&vmm, &src_cfg, None);
                wait("the source guest to count", LIMIT, || {
                    std::fs::read_to_string(dir.join("src.log"))
                        .map(|l| l.lines().count() > 3)
                        .unwrap_or(false)
                });
                let _dst = start(&vmm, &dst_cfg, Some(&incoming));
                wait("the destination to listen", LIMIT, || incoming.exists());
                let mut s = UnixStream::connect(&src_sock).expect("control");
                let req = VmmRequest::MigrateSend {
                    downtime_limit_ms: std::env::var("HVNODE_BENCH_DOWNTIME_MS")
                        .ok()
                        .and_then(|v| v.parse().ok()),
                    max_passes: None,
                    timeout_secs: None,
                    verify_memory: false,
                };
                writeln!(s, "{}", serde_json::to_string(&req).expect("json")).expect("send");
                let mut line = Vec::new();
                let mut b = [0u8];
                while b[0] != b'\n' {
                    s.read_exact(&mut b).expect("answer");
                    line.push(b[0]);
                }
                tls_relay(s, &incoming);
                wait("the migration to end", LIMIT, || {
                    status(&src_sock).is_some_and(|s| !s.phase.in_progress())
                });
                let st = status(&src_sock).expect("status");
                let Some(r) = st.result.clone() else {
                    panic!(
                        "{kind} {mib} MiB run {run}: {:?} (VMM logs in {})",
                        st.error,
                        dir.display()
                    );
                };
                wait("the guest to run on the destination", LIMIT, || {
                    matches!(
                        ask(&dst_sock, &VmmRequest::Describe),
                        Some(VmmResponse::Description {
                            state: hvnode_api::vmm::VmRunState::Running,
                            ..
                        })
                    )
                });
                let f = [
                    r.total_ms as f64,
                    r.downtime_ms as f64,
                    r.last_pass_ms as f64,
                    r.state_ms as f64,
                    r.transfer_ms as f64,
                    r.resume_ms as f64,
                    f64::from(r.passes),
                    (r.bytes_sent >> 20) as f64,
                    (st.dirty_rate_bytes_per_sec >> 20) as f64,
                ];
                for (v, x) in figures.iter_mut().zip(f) {
                    v.push(x);
                }
                for f in ["src.log", "dst.log", "dst.in"] {
                    let _ = std::fs::remove_file(dir.join(f));
                }
            }
            let downtimes: Vec<String> = figures[1].iter().map(|d| format!("{d:.0}")).collect();
            let m: Vec<f64> = figures.into_iter().map(median).collect();
            let name = format!("migrate_{kind}_{mib}mib");
            println!("{name}_total_ms {:.0}", m[0]);
            println!("{name}_downtime_ms {:.0}", m[1]);
            println!("{name}_downtime_runs_ms {}", downtimes.join(" "));
            println!(
                "{name}_downtime_parts_ms last_pass {:.0} state {:.0} transfer {:.0} resume {:.0}",
                m[2], m[3], m[4], m[5]
            );
            println!("{name}_passes {:.0}", m[6]);
            println!("{name}_sent_mib {:.0}", m[7]);
            println!(
                "{name}_throughput_mib_s {:.0}",
                m[7] / (m[0] / 1000.0).max(0.001)
            );
            println!("{name}_dirty_rate_mib_s {:.0}", m[8]);
        }
    }
    if std::env::var_os("HVNODE_BENCH_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
}
