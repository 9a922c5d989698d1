//! A real, single-member etcd on loopback for tests, benchmarks and labs: started on free
//! ports with its own data directory, ready once it answers, killed (and waited for) and its
//! directory removed when the guard drops.

use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etcd_client::Client;

/// Where Debian's `etcd-server` puts etcd.
pub const ETCD_BIN: &str = "/usr/bin/etcd";

/// A running etcd, killed on drop.
#[derive(Debug)]
pub struct LocalEtcd {
    child: Option<Child>,
    dir: PathBuf,
    endpoint: String,
    /// With TLS: the client side the readiness check (and [`LocalEtcd::client`]) uses.
    tls: Option<crate::Tls>,
}

/// etcd's own TLS for [`LocalEtcd::start_tls`]: its server certificate and key, and the CA its
/// clients' certificates must chain to (PEM).
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// etcd's certificate (for 127.0.0.1).
    pub cert_pem: String,
    /// Its key.
    pub key_pem: String,
    /// The CA of the client certificates etcd admits.
    pub client_ca_pem: String,
}

/// The etcd binary to use: `$HVNODE_ETCD` or /usr/bin/etcd, if it exists.
pub fn etcd_binary() -> Option<PathBuf> {
    let p = std::env::var_os("HVNODE_ETCD")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(ETCD_BIN));
    p.is_file().then_some(p)
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

impl LocalEtcd {
    /// Starts `etcd` (see [`etcd_binary`]) on two free loopback ports and waits until it
    /// answers a status request (polling; gives up after `timeout`, with etcd's log). A port
    /// taken between choosing it and etcd binding it (tests run in parallel) means a new try on
    /// other ports, three at most.
    pub async fn start(etcd: &Path, timeout: Duration) -> Result<LocalEtcd, String> {
        Self::start_with(etcd, timeout, None).await
    }

    /// [`LocalEtcd::start`] serving TLS only (`https://`), admitting only clients whose
    /// certificate chains to `server.client_ca_pem` (`--client-cert-auth`); `client` is what the
    /// readiness check and [`LocalEtcd::client`] connect with.
    pub async fn start_tls(
        etcd: &Path,
        timeout: Duration,
        server: &ServerTls,
        client: &crate::Tls,
    ) -> Result<LocalEtcd, String> {
        Self::start_with(etcd, timeout, Some((server, client))).await
    }

    async fn start_with(
        etcd: &Path,
        timeout: Duration,
        tls: Option<(&ServerTls, &crate::Tls)>,
    ) -> Result<LocalEtcd, String> {
        let mut tries = 0;
        loop {
            tries += 1;
            match Self::start_once(etcd, timeout, tls).await {
                Err(e) if tries < 3 && e.contains("address already in use") => continue,
                r => return r,
            }
        }
    }

    async fn start_once(
        etcd: &Path,
        timeout: Duration,
        tls: Option<(&ServerTls, &crate::Tls)>,
    ) -> Result<LocalEtcd, String> {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let dir = std::env::temp_dir().join(format!("hvnode-etcd-{}-{stamp}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let (client_port, peer_port) = (free_port(), free_port());
        let (client_port, peer_port) = match (client_port, peer_port) {
            (Ok(c), Ok(p)) if c != p => (c, p),
            _ => return Err("no free loopback port".into()),
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let client_url = format!("{scheme}://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let log = std::fs::File::create(dir.join("etcd.log")).map_err(|e| e.to_string())?;
        let log2 = log.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = Command::new(etcd);
        if let Some((server, _)) = tls {
            let write = |name: &str, pem: &str| {
                let p = dir.join(name);
                std::fs::write(&p, pem)
                    .map(|()| p)
                    .map_err(|e| e.to_string())
            };
            cmd.arg(format!(
                "--cert-file={}",
                write("server.pem", &server.cert_pem)?.display()
            ))
            .arg(format!(
                "--key-file={}",
                write("server.key", &server.key_pem)?.display()
            ))
            .arg("--client-cert-auth")
            .arg(format!(
                "--trusted-ca-file={}",
                write("client-ca.pem", &server.client_ca_pem)?.display()
            ));
        }
        let child = cmd
            .arg("--name=test")
            .arg(format!("--data-dir={}", dir.join("data").display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=test={peer_url}"))
            .arg("--initial-cluster-state=new")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| format!("{}: {e}", etcd.display()))?;
        let mut me = LocalEtcd {
            child: Some(child),
            dir,
            endpoint: format!("127.0.0.1:{client_port}"),
            tls: tls.map(|(_, c)| c.clone()),
        };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(Ok(Some(status))) = me.child.as_mut().map(|c| c.try_wait()) {
                return Err(format!(
                    "etcd exited ({status}) before answering:\n{}",
                    me.log()
                ));
            }
            if let Ok(mut c) = me.client().await {
                if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(1), c.status()).await {
                    return Ok(me);
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "etcd did not answer within {timeout:?}:\n{}",
                    me.log()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// host:port of the client endpoint.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The client URL: `http://` or, started with TLS, `https://` and the endpoint.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.endpoint)
    }

    /// A new client of this etcd.
    pub async fn client(&self) -> crate::Result<Client> {
        crate::connect_with(&[self.url()], self.tls.as_ref()).await
    }

    /// etcd's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default()
    }

    /// Kills etcd and waits for it (as drop does; for tests of an unreachable etcd).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for LocalEtcd {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
