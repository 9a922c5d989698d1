//! `hvnodectl serve` over real TLS: a node's side of node-initiated registration played by
//! the library client with a self-signed node certificate, approval with the CLI, and
//! shutdown on SIGTERM. No agent needed.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hvnode_api::error::ErrorCode;
use hvnode_api::fingerprint;
use hvnode_api::registration::{JoinState, ManagerHello, NodeJoinRequest, NodeJoinStatus};
use hvnode_api::routes::ManagerRoute;
use hvnodectl::client::{ClientError, NodeClient};
use hvnodectl::pki;
use hvnodectl::state::{Identity, StateDir};
use hyper::Method;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hvnodectl-serve-it-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn ctl(state: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hvnodectl"))
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

struct Serve {
    child: Child,
    port: u16,
}

impl Serve {
    fn start(state: &Path) -> Serve {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(env!("CARGO_BIN_EXE_hvnodectl"))
            .arg("--state-dir")
            .arg(state)
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "serve did not start listening");
            std::thread::sleep(Duration::from_millis(50));
        }
        Serve { child, port }
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn server_fingerprint(state: &Path) -> String {
    let pem = std::fs::read(state.join("server.pem")).unwrap();
    fingerprint::of_der(&CertificateDer::from_pem_slice(&pem).unwrap())
}

/// A self-signed "node certificate" with its key.
fn node_identity() -> (String, Identity) {
    let kc = pki::new_ca("hv-node").unwrap();
    let chain = vec![CertificateDer::from_pem_slice(kc.cert_pem.as_bytes()).unwrap()];
    let key = PrivateKeyDer::from_pem_slice(kc.key_pem.as_bytes()).unwrap();
    (kc.cert_pem, Identity { chain, key })
}

#[tokio::test]
async fn node_join_request_is_approved_through_the_cli() {
    let dir = temp_dir("join");
    let state = dir.join("m");
    assert!(ctl(&state, &["init", "--name", "central"]).status.success());
    let serve = Serve::start(&state);

    // Anyone may read the manager hello.
    let anon = NodeClient::new(
        "manager",
        &serve.url(),
        Some(server_fingerprint(&state)),
        None,
    )
    .unwrap();
    let (hello, _): (ManagerHello, _) = anon.get_json(&ManagerRoute::Hello.path()).await.unwrap();
    assert_eq!(hello.name, "central");
    assert_eq!(hello.ca_pem, StateDir::new(&state).ca_pem().unwrap());

    // Without the node certificate as client certificate the request is refused.
    let (node_pem, identity) = node_identity();
    let join = NodeJoinRequest {
        hostname: "hv-node".into(),
        node_cert_pem: node_pem.clone(),
        api_port: 8443,
    };
    let err = anon
        .send_json::<_, NodeJoinStatus>(Method::POST, &ManagerRoute::Nodes.path(), Some(&join))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Api { code, .. } if *code == ErrorCode::ClientCertificateRequired),
        "{err}"
    );

    let node = NodeClient::new(
        "manager",
        &serve.url(),
        Some(server_fingerprint(&state)),
        Some(identity),
    )
    .unwrap();
    let (st, _): (NodeJoinStatus, _) = node
        .send_json(Method::POST, &ManagerRoute::Nodes.path(), Some(&join))
        .await
        .unwrap();
    assert_eq!(st.state, JoinState::Pending);

    let listed = ctl(&state, &["requests"]);
    assert!(String::from_utf8_lossy(&listed.stdout).contains("hv-node"));
    let approved = ctl(&state, &["approve", "hv-node", "--name", "n1"]);
    assert!(
        approved.status.success(),
        "{}",
        String::from_utf8_lossy(&approved.stderr)
    );

    let fp = fingerprint::of_der(&CertificateDer::from_pem_slice(node_pem.as_bytes()).unwrap());
    // Unencoded `:`, as a node may send it: the manager decodes either form.
    let (st, _): (NodeJoinStatus, _) = node.get_json(&format!("/v1/nodes/{fp}")).await.unwrap();
    assert_eq!(st.state, JoinState::Approved);
    let entry = StateDir::new(&state).node("n1").unwrap().unwrap();
    assert_eq!(entry.fingerprint, fp);
    assert_eq!(entry.url, "https://127.0.0.1:8443");
    drop(serve);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn pinned_client_reports_fingerprint_mismatch() {
    let dir = temp_dir("pin");
    let state = dir.join("m");
    assert!(ctl(&state, &["init", "--name", "central"]).status.success());
    let serve = Serve::start(&state);
    let wrong = fingerprint::of_der(b"another certificate");
    let c = NodeClient::new("n1", &serve.url(), Some(wrong.clone()), None).unwrap();
    let err = c
        .get_json::<ManagerHello>(&ManagerRoute::Hello.path())
        .await
        .unwrap_err();
    let actual = server_fingerprint(&state);
    assert_eq!(
        err.to_string(),
        format!("node certificate fingerprint is {actual}, expected {wrong}: the node was reinstalled or this is not the node you registered; re-register")
    );
    drop(serve);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn server_certificate_verifies_against_the_manager_ca_for_loopback() {
    // A node verifies the manager with the accepted CA and the host of the manager URL.
    let dir = temp_dir("ca");
    let state = dir.join("m");
    assert!(ctl(&state, &["init", "--name", "central"]).status.success());
    let serve = Serve::start(&state);
    let mut roots = rustls::RootCertStore::empty();
    let ca_pem = StateDir::new(&state).ca_pem().unwrap();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(hvnode_tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    for host in ["127.0.0.1", "localhost"] {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", serve.port))
            .await
            .unwrap();
        connector
            .connect(ServerName::try_from(host).unwrap().to_owned(), tcp)
            .await
            .unwrap_or_else(|e| panic!("{host}: {e}"));
    }
    drop(serve);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn serve_stops_on_sigterm() {
    let dir = temp_dir("term");
    let state = dir.join("m");
    assert!(ctl(&state, &["init", "--name", "central"]).status.success());
    let mut serve = Serve::start(&state);
    let status = Command::new("kill")
        .args(["-TERM", &serve.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(code) = serve.child.try_wait().unwrap() {
            assert!(code.success(), "{code}");
            break;
        }
        assert!(Instant::now() < deadline, "serve ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = std::fs::remove_dir_all(&dir);
}
