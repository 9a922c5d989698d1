//! The manager's state directory: CA, client and server certificates, the registered
//! nodes and the join requests of node-initiated registration. Every write is atomic
//! ([`write_atomic`]: temp file, fsync, rename, fsync of the directory).

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use hvnode_api::fingerprint;
use hvnode_api::registration::JoinState;
use hvnode_base::fs::write_atomic;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

use crate::pki::{self, KeyAndCert, Usage};

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A file could not be read or written.
    #[error("Cannot access {0}")]
    Io(PathBuf, #[source] std::io::Error),
    /// `init` found an existing state.
    #[error(
        "{0} already holds a manager state; refusing to overwrite it (use another --state-dir)"
    )]
    Exists(PathBuf),
    /// No state yet.
    #[error("No manager state in {0}: run `hvnodectl init --name <manager-name>` first")]
    Missing(PathBuf),
    /// A TOML file is malformed.
    #[error("Cannot parse {0}: {1}")]
    Parse(PathBuf, String),
    /// A PEM file is malformed.
    #[error("Cannot parse PEM in {0}")]
    Pem(PathBuf),
    /// Certificate generation failed.
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    /// Neither `--state-dir`, `HVNODECTL_STATE` nor `HOME` is set.
    #[error("Cannot find a state directory: set --state-dir, HVNODECTL_STATE or HOME")]
    NoHome,
    /// The manager name is empty or too long.
    #[error("Invalid manager name {0:?}: use 1-64 printable characters")]
    Name(String),
}

/// `manager.toml`: who this manager is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManagerInfo {
    /// Manager name (CA common name).
    pub name: String,
    /// Unix time of `init`.
    pub created_at: u64,
    /// Subject alternative names in the server certificate.
    #[serde(default)]
    pub server_names: Vec<String>,
}

/// One registered node in `nodes.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeEntry {
    /// Base URL of the node API, `https://HOST:PORT`.
    pub url: String,
    /// Pinned SHA-256 fingerprint of the node certificate.
    pub fingerprint: String,
    /// Unix time of registration.
    pub registered_at: u64,
}

/// `nodes.toml`: node name → entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nodes {
    /// The registered nodes by name.
    #[serde(default)]
    pub nodes: BTreeMap<String, NodeEntry>,
}

/// `cluster.toml`: the cluster this manager set up (`hvnodectl cluster init`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// etcd client URLs.
    pub endpoints: Vec<String>,
    /// The key prefix in etcd.
    pub prefix: String,
    /// The etcd URLs nodes use, when not `endpoints`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_endpoints: Vec<String>,
}

/// `join-requests/<fingerprint>.toml`: a node asked to join (node-initiated registration).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRecord {
    /// Host name the node gave.
    pub hostname: String,
    /// Fingerprint of the node certificate.
    pub fingerprint: String,
    /// PEM of the node certificate.
    pub node_cert_pem: String,
    /// Source IP address of the request.
    pub source_ip: String,
    /// TCP port of the node API.
    pub api_port: u16,
    /// Unix time the request arrived.
    pub received_at: u64,
    /// Decision so far.
    pub state: JoinState,
    /// Name given to the node on approval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
}

impl JoinRecord {
    /// The URL of the node API as seen from the manager.
    pub fn default_url(&self) -> String {
        if self.source_ip.contains(':') {
            format!("https://[{}]:{}", self.source_ip, self.api_port)
        } else {
            format!("https://{}:{}", self.source_ip, self.api_port)
        }
    }
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

const CA_KEY: &str = "ca.key";
const CA_CERT: &str = "ca.pem";
const CLIENT_KEY: &str = "client.key";
const CLIENT_CERT: &str = "client.pem";
const SERVER_KEY: &str = "server.key";
const SERVER_CERT: &str = "server.pem";
const MANAGER: &str = "manager.toml";
const NODES: &str = "nodes.toml";
const JOIN_DIR: &str = "join-requests";
const CLUSTER: &str = "cluster.toml";

/// A client or server identity ready for rustls.
#[derive(Debug)]
pub struct Identity {
    /// Leaf certificate first.
    pub chain: Vec<CertificateDer<'static>>,
    /// Its private key.
    pub key: PrivateKeyDer<'static>,
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// A state directory at `root` (not touched until used).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// `$XDG_DATA_HOME/hvnodectl` or `~/.local/share/hvnodectl`.
    pub fn default_path() -> Result<PathBuf, StateError> {
        if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
            return Ok(PathBuf::from(d).join("hvnodectl"));
        }
        let home = std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .ok_or(StateError::NoHome)?;
        Ok(PathBuf::from(home).join(".local/share/hvnodectl"))
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Path of the CA certificate.
    pub fn ca_cert_path(&self) -> PathBuf {
        self.root.join(CA_CERT)
    }

    /// Creates a new manager: CA, client and server certificates. Refuses to touch an
    /// existing state. `server_names` go into the server certificate besides the defaults.
    pub fn init(&self, name: &str, server_names: &[String]) -> Result<ManagerInfo, StateError> {
        if name.trim().is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
            return Err(StateError::Name(name.to_owned()));
        }
        if self.root.join(MANAGER).exists() || self.root.join(CA_KEY).exists() {
            return Err(StateError::Exists(self.root.clone()));
        }
        fs::create_dir_all(&self.root).map_err(|e| StateError::Io(self.root.clone(), e))?;
        fs::set_permissions(&self.root, fs::Permissions::from_mode(0o700))
            .map_err(|e| StateError::Io(self.root.clone(), e))?;
        let join = self.root.join(JOIN_DIR);
        fs::create_dir_all(&join).map_err(|e| StateError::Io(join, e))?;

        let ca = pki::new_ca(name)?;
        let client = pki::issue(&ca, &format!("{name} client"), &[], Usage::Client)?;
        let names = default_server_names(name, server_names);
        let server = pki::issue(&ca, name, &names, Usage::Server)?;
        self.write(CA_KEY, ca.key_pem.as_bytes(), 0o600)?;
        self.write(CA_CERT, ca.cert_pem.as_bytes(), 0o644)?;
        self.write(CLIENT_KEY, client.key_pem.as_bytes(), 0o600)?;
        self.write(CLIENT_CERT, client.cert_pem.as_bytes(), 0o644)?;
        self.write(SERVER_KEY, server.key_pem.as_bytes(), 0o600)?;
        self.write(SERVER_CERT, server.cert_pem.as_bytes(), 0o644)?;
        self.save_nodes(&Nodes::default())?;
        let info = ManagerInfo {
            name: name.to_owned(),
            created_at: now(),
            server_names: names,
        };
        self.write_toml(MANAGER, &info)?;
        Ok(info)
    }

    /// Re-issues the server certificate when some of `extra` are missing from it.
    /// Returns whether a new certificate was written.
    pub fn ensure_server_names(&self, extra: &[String]) -> Result<bool, StateError> {
        let mut info = self.manager()?;
        let missing: Vec<String> = extra
            .iter()
            .filter(|n| !info.server_names.contains(n))
            .cloned()
            .collect();
        if missing.is_empty() {
            return Ok(false);
        }
        info.server_names.extend(missing);
        let ca = KeyAndCert {
            key_pem: self.read_string(CA_KEY)?,
            cert_pem: self.read_string(CA_CERT)?,
        };
        let server = pki::issue(&ca, &info.name, &info.server_names, Usage::Server)?;
        self.write(SERVER_KEY, server.key_pem.as_bytes(), 0o600)?;
        self.write(SERVER_CERT, server.cert_pem.as_bytes(), 0o644)?;
        self.write_toml(MANAGER, &info)?;
        Ok(true)
    }

    /// The CA's key and certificate, to sign with.
    pub fn ca(&self) -> Result<KeyAndCert, StateError> {
        self.manager()?;
        Ok(KeyAndCert {
            key_pem: self.read_string(CA_KEY)?,
            cert_pem: self.read_string(CA_CERT)?,
        })
    }

    /// The manager identity.
    pub fn manager(&self) -> Result<ManagerInfo, StateError> {
        if !self.root.join(MANAGER).exists() {
            return Err(StateError::Missing(self.root.clone()));
        }
        self.read_toml(MANAGER)
    }

    /// PEM of the CA certificate.
    pub fn ca_pem(&self) -> Result<String, StateError> {
        self.manager()?;
        self.read_string(CA_CERT)
    }

    /// Fingerprint of the CA certificate.
    pub fn ca_fingerprint(&self) -> Result<String, StateError> {
        let path = self.root.join(CA_CERT);
        let der = CertificateDer::from_pem_slice(self.ca_pem()?.as_bytes())
            .map_err(|_| StateError::Pem(path))?;
        Ok(fingerprint::of_der(&der))
    }

    /// The client certificate for mutual TLS to nodes.
    pub fn client_identity(&self) -> Result<Identity, StateError> {
        self.manager()?;
        self.identity(CLIENT_CERT, CLIENT_KEY)
    }

    /// The server certificate for `serve`.
    pub fn server_identity(&self) -> Result<Identity, StateError> {
        self.manager()?;
        self.identity(SERVER_CERT, SERVER_KEY)
    }

    fn identity(&self, cert: &str, key: &str) -> Result<Identity, StateError> {
        load_identity(&self.root.join(cert), &self.root.join(key))
    }

    /// TLS to the cluster's etcd: the CA, and the manager's client certificate and key (PEM).
    pub fn etcd_tls(&self) -> Result<hvnode_cluster::Tls, StateError> {
        Ok(hvnode_cluster::Tls {
            ca_pem: self.ca_pem()?,
            cert_pem: self.read_string(CLIENT_CERT)?,
            key_pem: self.read_string(CLIENT_KEY)?,
        })
    }

    /// The registered nodes.
    pub fn load_nodes(&self) -> Result<Nodes, StateError> {
        self.manager()?;
        if !self.root.join(NODES).exists() {
            return Ok(Nodes::default());
        }
        self.read_toml(NODES)
    }

    /// Saves the registered nodes.
    pub fn save_nodes(&self, nodes: &Nodes) -> Result<(), StateError> {
        self.write_toml(NODES, nodes)
    }

    /// The cluster, once `cluster init` set it up.
    pub fn cluster(&self) -> Result<Option<ClusterConfig>, StateError> {
        self.manager()?;
        if !self.root.join(CLUSTER).exists() {
            return Ok(None);
        }
        self.read_toml(CLUSTER).map(Some)
    }

    /// Saves the cluster's settings.
    pub fn save_cluster(&self, cluster: &ClusterConfig) -> Result<(), StateError> {
        self.write_toml(CLUSTER, cluster)
    }

    /// One registered node.
    pub fn node(&self, name: &str) -> Result<Option<NodeEntry>, StateError> {
        Ok(self.load_nodes()?.nodes.remove(name))
    }

    /// All join requests, oldest first.
    pub fn join_requests(&self) -> Result<Vec<JoinRecord>, StateError> {
        self.manager()?;
        let dir = self.root.join(JOIN_DIR);
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(StateError::Io(dir, e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| StateError::Io(dir.clone(), e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if !name.ends_with(".toml") {
                continue;
            }
            out.push(self.read_toml(&format!("{JOIN_DIR}/{name}"))?);
        }
        out.sort_by(|a: &JoinRecord, b| {
            (a.received_at, &a.hostname).cmp(&(b.received_at, &b.hostname))
        });
        Ok(out)
    }

    /// The join request of the node with this certificate fingerprint (canonical form).
    pub fn join_request(&self, fingerprint: &str) -> Result<Option<JoinRecord>, StateError> {
        let rel = format!("{JOIN_DIR}/{fingerprint}.toml");
        if !self.root.join(&rel).exists() {
            return Ok(None);
        }
        self.read_toml(&rel).map(Some)
    }

    /// Stores a join request.
    pub fn save_join_request(&self, record: &JoinRecord) -> Result<(), StateError> {
        let dir = self.root.join(JOIN_DIR);
        fs::create_dir_all(&dir).map_err(|e| StateError::Io(dir, e))?;
        self.write_toml(&format!("{JOIN_DIR}/{}.toml", record.fingerprint), record)
    }

    fn read_string(&self, rel: &str) -> Result<String, StateError> {
        let path = self.root.join(rel);
        fs::read_to_string(&path).map_err(|e| StateError::Io(path, e))
    }

    fn read_toml<T: serde::de::DeserializeOwned>(&self, rel: &str) -> Result<T, StateError> {
        let text = self.read_string(rel)?;
        toml::from_str(&text).map_err(|e| StateError::Parse(self.root.join(rel), e.to_string()))
    }

    fn write_toml<T: Serialize>(&self, rel: &str, value: &T) -> Result<(), StateError> {
        let text = toml::to_string(value)
            .map_err(|e| StateError::Parse(self.root.join(rel), e.to_string()))?;
        self.write(rel, text.as_bytes(), 0o644)
    }

    fn write(&self, rel: &str, data: &[u8], mode: u32) -> Result<(), StateError> {
        let path = self.root.join(rel);
        write_atomic(&path, data, mode).map_err(|e| StateError::Io(path, e))
    }
}

/// Loads a PEM certificate chain and private key.
pub fn load_identity(cert: &Path, key: &Path) -> Result<Identity, StateError> {
    let cert_pem = fs::read(cert).map_err(|e| StateError::Io(cert.to_owned(), e))?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| StateError::Pem(cert.to_owned()))?;
    if chain.is_empty() {
        return Err(StateError::Pem(cert.to_owned()));
    }
    let key_pem = fs::read(key).map_err(|e| StateError::Io(key.to_owned(), e))?;
    let key =
        PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| StateError::Pem(key.to_owned()))?;
    Ok(Identity { chain, key })
}

/// The names the server certificate always carries: the manager name when it is a valid
/// DNS name, this host's name, localhost and the loopback addresses.
fn default_server_names(name: &str, extra: &[String]) -> Vec<String> {
    let mut names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    if let Ok(host) = fs::read_to_string("/proc/sys/kernel/hostname") {
        let host = host.trim();
        if is_dns_name(host) {
            names.push(host.to_owned());
        }
    }
    if is_dns_name(name) {
        names.push(name.to_owned());
    }
    for n in extra {
        if !names.contains(n) {
            names.push(n.clone());
        }
    }
    names
}

fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "hvnodectl-state-{tag}-{}-{}",
            std::process::id(),
            now()
        ));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn init_creates_keys_with_mode_0600_and_refuses_to_overwrite() {
        let dir = temp_dir("init");
        let state = StateDir::new(&dir);
        let info = state.init("lab manager", &["mgr.example".into()]).unwrap();
        assert_eq!(info.name, "lab manager");
        assert!(info.server_names.contains(&"mgr.example".to_owned()));
        for key in [CA_KEY, CLIENT_KEY, SERVER_KEY] {
            let mode = fs::metadata(dir.join(key)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{key}");
        }
        assert!(state.client_identity().is_ok());
        assert!(state.server_identity().is_ok());
        assert_eq!(state.ca_fingerprint().unwrap().len(), 95);
        let ca_before = fs::read(dir.join(CA_KEY)).unwrap();
        assert!(matches!(
            state.init("other", &[]),
            Err(StateError::Exists(_))
        ));
        assert_eq!(fs::read(dir.join(CA_KEY)).unwrap(), ca_before);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn commands_on_a_missing_state_say_to_run_init() {
        let state = StateDir::new(temp_dir("missing"));
        let err = state.load_nodes().unwrap_err();
        assert!(matches!(err, StateError::Missing(_)));
        assert!(err.to_string().contains("hvnodectl init"));
    }

    #[test]
    fn nodes_and_join_requests_round_trip() {
        let dir = temp_dir("nodes");
        let state = StateDir::new(&dir);
        state.init("m", &[]).unwrap();
        let mut nodes = Nodes::default();
        nodes.nodes.insert(
            "node-1".into(),
            NodeEntry {
                url: "https://192.0.2.10:8443".into(),
                fingerprint: fingerprint::of_der(b"x"),
                registered_at: 1_700_000_000,
            },
        );
        state.save_nodes(&nodes).unwrap();
        assert_eq!(state.load_nodes().unwrap(), nodes);
        assert_eq!(
            state.node("node-1").unwrap().unwrap().url,
            "https://192.0.2.10:8443"
        );

        let record = JoinRecord {
            hostname: "hv1".into(),
            fingerprint: fingerprint::of_der(b"y"),
            node_cert_pem: "PEM".into(),
            source_ip: "2001:db8::1".into(),
            api_port: 8443,
            received_at: 5,
            state: JoinState::Pending,
            node_name: None,
        };
        state.save_join_request(&record).unwrap();
        assert_eq!(
            state.join_request(&record.fingerprint).unwrap(),
            Some(record.clone())
        );
        assert_eq!(state.join_requests().unwrap(), vec![record.clone()]);
        assert_eq!(record.default_url(), "https://[2001:db8::1]:8443");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn server_names_are_added_only_when_missing() {
        let dir = temp_dir("sans");
        let state = StateDir::new(&dir);
        state.init("m", &[]).unwrap();
        assert!(!state.ensure_server_names(&["localhost".into()]).unwrap());
        assert!(state.ensure_server_names(&["10.1.2.3".into()]).unwrap());
        assert!(state
            .manager()
            .unwrap()
            .server_names
            .contains(&"10.1.2.3".to_owned()));
        fs::remove_dir_all(&dir).unwrap();
    }
}
