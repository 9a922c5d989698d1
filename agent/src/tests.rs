//! Router tests: requests go straight into `Agent::handle`, no sockets.

use super::*;
use crate::console::console_tail;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hvnode_api::routes::CONSOLE_PROTOCOL;
use hyper::{Request, StatusCode};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

fn scratch_root() -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let root = std::env::temp_dir().join(format!(
        "hvnode-agent-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&root);
    root
}

fn agent() -> (Arc<Agent>, PathBuf) {
    let root = scratch_root();
    (Arc::new(Agent::new(paths_under(&root)).unwrap()), root)
}

fn req(method: &str, path: &str, body: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap()
}

async fn call(
    a: &Arc<Agent>,
    r: Request<Full<Bytes>>,
    o: Origin,
) -> (StatusCode, serde_json::Value) {
    let resp = a.handle(r, o).await;
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    )
}

const ANON: Origin = Origin::Tcp {
    client_generation: None,
    node_peer: false,
};

fn ca_pem() -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.self_signed(&key).unwrap().pem()
}

#[tokio::test]
async fn health_is_local_only() {
    let (a, _) = agent();
    assert_eq!(
        call(&a, req("GET", "/v1/health", ""), Origin::Local)
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        call(&a, req("GET", "/v1/health", ""), ANON).await.0,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn pairing_code_is_shown_locally_never_over_tcp() {
    let (a, _) = agent();
    let (_, local) = call(&a, req("GET", "/v1/registration", ""), Origin::Local).await;
    assert_eq!(local["pairing_code"].as_str().unwrap().len(), 8);
    assert_eq!(local["state"], "unregistered");
    let (s, tcp) = call(&a, req("GET", "/v1/registration", ""), ANON).await;
    assert_eq!(s, StatusCode::OK);
    assert!(tcp.get("pairing_code").is_none());
    assert_eq!(tcp["node_fingerprint"], local["node_fingerprint"]);
}

#[tokio::test]
async fn unregistered_tcp_serves_only_registration() {
    let (a, _) = agent();
    let (s, e) = call(&a, req("GET", "/v1/node", ""), ANON).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(e["code"], "not_registered");
}

#[tokio::test]
async fn pairs_with_the_right_code_then_requires_client_certificates() {
    let (a, _) = agent();
    let (_, local) = call(&a, req("GET", "/v1/registration", ""), Origin::Local).await;
    let code = local["pairing_code"].as_str().unwrap().to_owned();
    let body =
        serde_json::json!({"code": code, "manager_name": "m1", "ca_pem": ca_pem()}).to_string();
    let (s, r) = call(&a, req("POST", "/v1/registration", &body), ANON).await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert_eq!(r["state"], "registered");
    let (_, gen) = a.tls_config();
    let (s, e) = call(&a, req("GET", "/v1/node", ""), ANON).await;
    assert_eq!(
        (s, e["code"].as_str()),
        (
            StatusCode::UNAUTHORIZED,
            Some("client_certificate_required")
        )
    );
    let stale = Origin::Tcp {
        client_generation: Some(gen - 1),
        node_peer: false,
    };
    assert_eq!(
        call(&a, req("GET", "/v1/node", ""), stale).await.0,
        StatusCode::FORBIDDEN
    );
    let manager = Origin::Tcp {
        client_generation: Some(gen),
        node_peer: false,
    };
    let (s, info) = call(&a, req("GET", "/v1/node", ""), manager).await;
    assert_eq!(s, StatusCode::OK);
    assert!(info["kvm"].is_boolean());
    // Another node of this manager may hand over a guest, and do nothing else; the manager
    // may not call the node-to-node routes.
    let node = Origin::Tcp {
        client_generation: Some(gen),
        node_peer: true,
    };
    let (s, e) = call(&a, req("GET", "/v1/node", ""), node).await;
    assert_eq!(
        (s, e["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("node_certificate_required"))
    );
    let (s, e) = call(&a, req("POST", "/v1/migrations", "{}"), manager).await;
    assert_eq!(
        (s, e["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("node_certificate_required"))
    );
    let (s, e) = call(&a, req("POST", "/v1/migrations", "{}"), node).await;
    assert_eq!(
        (s, e["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_json"))
    );
    let (s, e) = call(&a, req("GET", "/v1/migrations/web/stream", ""), node).await;
    assert_eq!(
        (s, e["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("upgrade_required"))
    );
    // A second manager cannot take over over the network.
    let (s, e) = call(&a, req("POST", "/v1/registration", &body), ANON).await;
    assert_eq!(
        (s, e["code"].as_str()),
        (StatusCode::CONFLICT, Some("already_registered"))
    );
    // Unregistering revokes the old trust.
    assert_eq!(
        call(&a, req("DELETE", "/v1/registration", ""), manager)
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        call(&a, req("GET", "/v1/node", ""), manager).await.0,
        StatusCode::FORBIDDEN
    );
}

#[tokio::test]
async fn five_wrong_codes_replace_the_code() {
    let (a, _) = agent();
    let (_, local) = call(&a, req("GET", "/v1/registration", ""), Origin::Local).await;
    let first = local["pairing_code"].as_str().unwrap().to_owned();
    let body = serde_json::json!({"code": "WRONGXXX", "manager_name": "m", "ca_pem": ca_pem()})
        .to_string();
    for _ in 0..4 {
        let (s, e) = call(&a, req("POST", "/v1/registration", &body), ANON).await;
        assert_eq!(
            (s, e["code"].as_str()),
            (StatusCode::FORBIDDEN, Some("wrong_pairing_code"))
        );
    }
    let (_, e) = call(&a, req("POST", "/v1/registration", &body), ANON).await;
    assert_eq!(e["code"], "pairing_locked");
    let (_, local) = call(&a, req("GET", "/v1/registration", ""), Origin::Local).await;
    assert_ne!(local["pairing_code"].as_str().unwrap(), first);
}

#[tokio::test]
async fn bad_input_gets_clear_errors() {
    let (a, _) = agent();
    let (s, e) = call(&a, req("POST", "/v1/guests", "{not json"), Origin::Local).await;
    assert_eq!(
        (s, e["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_json"))
    );
    let plain = Request::builder()
        .method("POST")
        .uri("/v1/guests")
        .body(Full::new(Bytes::from("{}")))
        .unwrap();
    assert_eq!(
        call(&a, plain, Origin::Local).await.0,
        StatusCode::UNSUPPORTED_MEDIA_TYPE
    );
    let big = "x".repeat(BODY_LIMIT + 1);
    assert_eq!(
        call(&a, req("POST", "/v1/guests", &big), Origin::Local)
            .await
            .0,
        StatusCode::PAYLOAD_TOO_LARGE
    );
    assert_eq!(
        call(&a, req("GET", "/v1/nope", ""), Origin::Local).await.0,
        StatusCode::NOT_FOUND
    );
    let escape = r#"{"name":"g","kernel":"../etc/shadow"}"#;
    let (s, e) = call(&a, req("POST", "/v1/guests", escape), Origin::Local).await;
    assert_eq!(
        (s, e["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_guest_spec"))
    );
}

#[tokio::test]
async fn guest_definitions_are_created_read_updated_and_deleted() {
    let (a, root) = agent();
    let spec = r#"{"name":"web","kernel":"vmlinuz","memory_mib":128}"#;
    assert_eq!(
        call(&a, req("POST", "/v1/guests", spec), Origin::Local)
            .await
            .0,
        StatusCode::CREATED
    );
    assert_eq!(
        call(&a, req("POST", "/v1/guests", spec), Origin::Local)
            .await
            .0,
        StatusCode::CONFLICT
    );
    assert!(root.join("data/guests/web.toml").is_file());
    let upd = r#"{"name":"web","kernel":"vmlinuz","memory_mib":256}"#;
    let (s, g) = call(&a, req("PUT", "/v1/guests/web", upd), Origin::Local).await;
    assert_eq!(
        (s, g["spec"]["memory_mib"].as_u64()),
        (StatusCode::OK, Some(256))
    );
    let (_, list) = call(&a, req("GET", "/v1/guests", ""), Origin::Local).await;
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(
        call(&a, req("DELETE", "/v1/guests/web", ""), Origin::Local)
            .await
            .0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        call(&a, req("GET", "/v1/guests/web", ""), Origin::Local)
            .await
            .0,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn hostname_is_saved_and_needs_init_for_the_live_change() {
    let (a, root) = agent();
    let (s, e) = call(
        &a,
        req("PUT", "/v1/node/hostname", r#"{"hostname":"-bad"}"#),
        Origin::Local,
    )
    .await;
    assert_eq!(
        (s, e["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_hostname"))
    );
    let (s, e) = call(
        &a,
        req("PUT", "/v1/node/hostname", r#"{"hostname":"rack7"}"#),
        Origin::Local,
    )
    .await;
    assert_eq!(
        (s, e["code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("init_unavailable"))
    );
    let saved = std::fs::read_to_string(root.join("data/node.toml")).unwrap();
    assert!(saved.contains("rack7"));
}

#[tokio::test]
async fn images_upload_list_delete_and_guest_start_checks_paths() {
    let (a, root) = agent();
    let put = Request::builder()
        .method("PUT")
        .uri("/v1/images/kernels/vmlinuz")
        .body(Full::new(Bytes::from(vec![7u8; 3 << 20])))
        .unwrap();
    let (s, r) = call(&a, put, Origin::Local).await;
    assert_eq!(
        (s, r["size_bytes"].as_u64()),
        (StatusCode::CREATED, Some(3 << 20)),
        "{r}"
    );
    assert_eq!(
        std::fs::metadata(root.join("images/kernels/vmlinuz"))
            .unwrap()
            .len(),
        3 << 20
    );
    let (_, list) = call(&a, req("GET", "/v1/images", ""), Origin::Local).await;
    assert_eq!(list[0]["path"], "kernels/vmlinuz");
    let escape = Request::builder()
        .method("PUT")
        .uri("/v1/images/../x")
        .body(Full::new(Bytes::from("x")))
        .unwrap();
    assert_eq!(
        call(&a, escape, Origin::Local).await.0,
        StatusCode::BAD_REQUEST
    );
    let spec = r#"{"name":"g","kernel":"kernels/missing","rng":false}"#;
    assert_eq!(
        call(&a, req("POST", "/v1/guests", spec), Origin::Local)
            .await
            .0,
        StatusCode::CREATED
    );
    let (s, e) = call(&a, req("POST", "/v1/guests/g/start", ""), Origin::Local).await;
    assert_eq!(
        (s, e["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_guest_path"))
    );
    let (s, e) = call(&a, req("POST", "/v1/guests/g/stop", ""), Origin::Local).await;
    assert_eq!(
        (s, e["code"].as_str()),
        (StatusCode::CONFLICT, Some("invalid_guest_state"))
    );
    let del = Request::builder()
        .method("DELETE")
        .uri("/v1/images/kernels/vmlinuz")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(call(&a, del, Origin::Local).await.0, StatusCode::NO_CONTENT);
}

/// Answers every request on the agent's init socket with `ok`, recording them.
fn fake_init(root: &Path) -> Arc<Mutex<Vec<String>>> {
    use std::io::{BufRead, BufReader, Write};
    let seen = Arc::new(Mutex::new(Vec::new()));
    let listener = std::os::unix::net::UnixListener::bind(root.join("init.sock")).unwrap();
    let log = Arc::clone(&seen);
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let mut line = String::new();
            let mut r = BufReader::new(conn.try_clone().unwrap());
            if r.read_line(&mut line).is_ok() {
                log.lock().unwrap().push(line);
                let _ = writeln!(&conn, r#"{{"result":"ok"}}"#);
            }
        }
    });
    seen
}

#[tokio::test]
async fn network_changes_wait_for_confirmation_and_roll_back() {
    let (a, root) = agent();
    let net = r#"{"interfaces":[{"name":"eth0","mode":"static","addresses":["192.0.2.10/24"]}]}"#;
    let (s, e) = call(&a, req("PUT", "/v1/network", net), Origin::Local).await;
    assert_eq!(
        (s, e["code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("init_unavailable"))
    );
    let seen = fake_init(&root);
    let bad = r#"{"interfaces":[{"name":"eth0","vlan":5000}]}"#;
    assert_eq!(
        call(&a, req("PUT", "/v1/network", bad), Origin::Local)
            .await
            .0,
        StatusCode::BAD_REQUEST
    );
    let (s, v) = call(&a, req("PUT", "/v1/network", net), Origin::Local).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(v["rollback_in_secs"].as_u64().unwrap() > 50);
    assert_eq!(
        call(&a, req("POST", "/v1/network/rollback", ""), Origin::Local)
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        seen.lock().unwrap().len(),
        2,
        "applied, then the saved config re-applied"
    );
    assert_eq!(
        call(&a, req("POST", "/v1/network/confirm", ""), Origin::Local)
            .await
            .0,
        StatusCode::CONFLICT
    );
    call(&a, req("PUT", "/v1/network", net), Origin::Local).await;
    assert_eq!(
        call(&a, req("POST", "/v1/network/confirm", ""), Origin::Local)
            .await
            .0,
        StatusCode::OK
    );
    assert!(std::fs::read_to_string(root.join("data/node.toml"))
        .unwrap()
        .contains("192.0.2.10/24"));
    let mismatch = r#"{"device":"/dev/sdb","confirm":"/dev/sdc"}"#;
    let (s, e) = call(&a, req("POST", "/v1/storage/init", mismatch), Origin::Local).await;
    assert_eq!(
        (s, e["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("confirmation_mismatch"))
    );
}

#[tokio::test]
async fn an_unconfirmed_network_change_still_rolls_back_after_an_agent_restart() {
    let (a, root) = agent();
    let seen = fake_init(&root);
    let net = r#"{"interfaces":[{"name":"eth0","mode":"static","addresses":["192.0.2.10/24"]}]}"#;
    let (s, v) = call(&a, req("PUT", "/v1/network", net), Origin::Local).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    drop(a);

    // A new agent on the same run directory (the old one crashed) takes the change over.
    let b = Arc::new(Agent::new(paths_under(&root)).unwrap());
    b.resume_network_rollback();
    let (_, v) = call(&b, req("GET", "/v1/network", ""), Origin::Local).await;
    let left = v["rollback_in_secs"].as_u64().expect("still pending");
    assert!((50..=60).contains(&left), "{v}");
    assert!(v["pending"]["interfaces"].is_array(), "{v}");
    assert_eq!(seen.lock().unwrap().len(), 1, "nothing re-applied yet");

    // Past its deadline (as if the agent was down for longer than a minute) it rolls back at once.
    let file = root.join("run/network-pending.json");
    let mut pending: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    pending["deadline_ms"] = 0.into();
    std::fs::write(&file, pending.to_string()).unwrap();
    let c = Arc::new(Agent::new(paths_under(&root)).unwrap());
    c.resume_network_rollback();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while seen.lock().unwrap().len() < 2 {
        assert!(std::time::Instant::now() < deadline, "no rollback");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!file.exists(), "the pending file outlived the rollback");
    let (_, v) = call(&c, req("GET", "/v1/network", ""), Origin::Local).await;
    assert!(v["rollback_in_secs"].is_null(), "{v}");

    // A confirmed change leaves nothing behind for the next agent.
    call(&c, req("PUT", "/v1/network", net), Origin::Local).await;
    assert!(file.exists());
    call(&c, req("POST", "/v1/network/confirm", ""), Origin::Local).await;
    assert!(!file.exists());
}

#[tokio::test]
async fn events_stream_replays_and_follows_as_server_sent_events() {
    let (a, _) = agent();
    let spec = r#"{"name":"ev","kernel":"vmlinuz","rng":false}"#;
    call(&a, req("POST", "/v1/guests", spec), Origin::Local).await;
    let resp = a
        .handle(req("GET", "/v1/events?since=0", ""), Origin::Local)
        .await;
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    let first = next_frame(&mut body).await;
    assert!(
        first.starts_with("id: 1\ndata: ") && first.contains("guest_defined"),
        "{first}"
    );
    call(&a, req("DELETE", "/v1/guests/ev", ""), Origin::Local).await;
    let second = next_frame(&mut body).await;
    assert!(second.contains("guest_deleted"), "{second}");
}

async fn next_frame(b: &mut Body) -> String {
    let frame = tokio::time::timeout(Duration::from_secs(5), b.frame())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    String::from_utf8(frame.into_data().unwrap().to_vec()).unwrap()
}

/// The (method, path) pairs of docs/api.md's agent table, `{a,b}` alternatives expanded.
fn documented_routes() -> Vec<(String, String)> {
    let doc = include_str!("../../docs/api.md");
    let agent_part = doc.split("## Manager side").next().unwrap();
    let mut out = Vec::new();
    for line in agent_part.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() < 3 || !["GET", "POST", "PUT", "DELETE"].contains(&cells[1]) {
            continue;
        }
        let (method, path) = (cells[1], cells[2]);
        match path.rfind("/{").filter(|i| path[*i..].contains(',')) {
            Some(start) => {
                for op in path[start + 2..path.len() - 1].split(',') {
                    out.push((method.to_owned(), format!("{}/{op}", &path[..start])));
                }
            }
            None => out.push((method.to_owned(), path.to_owned())),
        }
    }
    out
}

/// Whether the router serves `method path` (whatever the answer, it is not the unknown-route
/// 404); `{name}`, `{path}` and `{snapshot}` are filled with sample values.
async fn is_routed(a: &Arc<Agent>, method: &str, path: &str) -> bool {
    let p = path
        .replace("{name}", "x")
        .replace("{path}", "dir/file")
        .replace("{snapshot}", "s1");
    if method == "GET" && p == "/v1/events" {
        // A stream: routed if it answers with the event-stream type.
        let resp = a.handle(req(method, &p, ""), Origin::Local).await;
        return resp.headers()["content-type"] == "text/event-stream";
    }
    let (_, body) = call(a, req(method, &p, "{}"), Origin::Local).await;
    body["code"] != "not_found" && body["code"] != "method_not_allowed"
}

/// Every route answers the methods it serves and only those: any other method is 405 with an
/// `Allow` header naming the served ones.
#[tokio::test]
async fn every_route_serves_its_methods_and_refuses_others_with_405() {
    let (a, _) = agent();
    for route in hvnode_api::routes::Route::examples() {
        let path = route.path();
        for method in ["GET", "POST", "PUT", "DELETE", "PATCH"] {
            if route.methods().contains(&method) {
                if !(method == "GET" && path == "/v1/events") {
                    let (_, body) = call(&a, req(method, &path, "{}"), Origin::Local).await;
                    assert_ne!(body["code"], "method_not_allowed", "{method} {path}");
                    assert_ne!(body["code"], "not_found", "{method} {path}");
                }
                continue;
            }
            let resp = a.handle(req(method, &path, "{}"), Origin::Local).await;
            assert_eq!(
                resp.status(),
                StatusCode::METHOD_NOT_ALLOWED,
                "{method} {path}"
            );
            assert_eq!(
                resp.headers()["allow"].to_str().unwrap(),
                route.methods().join(", "),
                "{method} {path}"
            );
        }
    }
}

/// Every route in docs/api.md's agent table is served, so the document and the router cannot
/// drift apart silently.
#[tokio::test]
async fn every_documented_route_is_routed() {
    let (a, _) = agent();
    let routes = documented_routes();
    for (method, path) in &routes {
        assert!(
            is_routed(&a, method, path).await,
            "{method} {path} is documented but not routed"
        );
    }
    assert!(
        routes.len() >= 30,
        "only {} routes found in docs/api.md",
        routes.len()
    );
}

/// agent/openapi.yaml describes what the router serves: each of its operations is routed, and
/// each route of docs/api.md has an operation there.
#[tokio::test]
async fn openapi_document_matches_the_router() {
    let doc: serde_yaml::Value =
        serde_yaml::from_str(include_str!("../openapi.yaml")).expect("openapi.yaml parses");
    assert!(
        doc["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.0")),
        "not an OpenAPI 3.0 document"
    );
    let paths = doc["paths"].as_mapping().expect("paths");
    let mut described = Vec::new();
    for (path, item) in paths {
        let path = path.as_str().expect("path").to_owned();
        for (method, _) in item.as_mapping().expect("path item") {
            let method = method.as_str().expect("method");
            if ["get", "put", "post", "delete", "patch", "head", "options"].contains(&method) {
                described.push((method.to_uppercase(), path.clone()));
            }
        }
    }
    let (a, _) = agent();
    for (method, path) in &described {
        assert!(
            is_routed(&a, method, path).await,
            "openapi.yaml describes {method} {path}, which the router does not serve"
        );
    }
    for route in documented_routes() {
        assert!(
            described.contains(&route),
            "{} {} is in docs/api.md but not in openapi.yaml",
            route.0,
            route.1
        );
    }
    // A comma or colon left unquoted in a flow mapping makes a key with no value.
    fn no_nulls(v: &serde_yaml::Value, at: &str) {
        match v {
            serde_yaml::Value::Null => panic!("openapi.yaml has an empty value at {at}"),
            serde_yaml::Value::Mapping(m) => {
                for (k, v) in m {
                    no_nulls(v, &format!("{at}/{}", k.as_str().unwrap_or("?")));
                }
            }
            serde_yaml::Value::Sequence(s) => s.iter().for_each(|v| no_nulls(v, at)),
            _ => {}
        }
    }
    no_nulls(&doc, "");
    // Every $ref names a schema, response or parameter that exists.
    let text = include_str!("../openapi.yaml");
    for r in text.split("$ref: \"#/").skip(1) {
        let target = r.split('"').next().unwrap();
        let mut node = &doc;
        for part in target.split('/') {
            node = &node[part];
        }
        assert!(!node.is_null(), "dangling $ref #/{target}");
    }
}

/// The `hvnode-vmm` binary next to this test's target dir (`cargo build -p hvnode-vmm`), or
/// `HVNODE_VMM_BIN`; `None`, with the reason printed, where it or a usable /dev/kvm is missing.
fn vmm_for(test: &str) -> Option<PathBuf> {
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !kvm {
        hvnode_base::testing::cannot_run(test, "/dev/kvm not available");
        return None;
    }
    let bin = std::env::var_os("HVNODE_VMM_BIN")
        .map(PathBuf::from)
        .or_else(|| {
            // <target>/debug/deps/<test> → <target>/debug/hvnode-vmm
            let exe = std::env::current_exe().ok()?;
            Some(exe.parent()?.parent()?.join("hvnode-vmm"))
        })
        .filter(|p| p.is_file());
    if bin.is_none() {
        hvnode_base::testing::cannot_run(test, "no hvnode-vmm binary (cargo build -p hvnode-vmm)");
    }
    bin
}

/// A test's directory; dropping it kills the VMMs still running from it (a failed assertion
/// would leave them up otherwise) and removes it.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        for e in std::fs::read_dir(self.0.join("run/vms"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let pid = std::fs::read_to_string(e.path().join("pid"))
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok());
            if let Some(pid) = pid {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An agent whose guests run on the real VMM, with a payload that prints `ready` and spins.
fn vmm_agent(vmm: &Path) -> (Arc<Agent>, Scratch) {
    let root = scratch_root();
    let mut paths = paths_under(&root);
    paths.vmm = vmm.to_owned();
    write_payload(&paths.images);
    (Arc::new(Agent::new(paths).unwrap()), Scratch(root))
}

fn write_payload(images: &Path) {
    use hvnode_vmm::payload::{elf64, serial_print, SPIN};
    let mut code = serial_print("ready\n");
    code.extend_from_slice(&SPIN);
    std::fs::create_dir_all(images).unwrap();
    std::fs::write(images.join("payload.elf"), elf64(&code)).unwrap();
}

const PAYLOAD_GUEST: &str = r#"{"name":"p","kernel":"payload.elf","memory_mib":64,"rng":false}"#;

async fn guest_state(a: &Arc<Agent>, name: &str) -> serde_json::Value {
    call(
        a,
        req("GET", &format!("/v1/guests/{name}"), ""),
        Origin::Local,
    )
    .await
    .1
}

/// Polls the guest until `done` holds for it, for at most 20 s.
async fn wait_guest(
    a: &Arc<Agent>,
    name: &str,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let g = guest_state(a, name).await;
        if done(&g) {
            return g;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "guest {name} never became {what}: {g}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_console(a: &Arc<Agent>, name: &str, text: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let resp = a
            .handle(
                req("GET", &format!("/v1/guests/{name}/console"), ""),
                Origin::Local,
            )
            .await;
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        if String::from_utf8_lossy(&body).contains(text) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{text:?} never reached the console of {name}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn op(a: &Arc<Agent>, name: &str, op: &str) -> (StatusCode, serde_json::Value) {
    call(
        a,
        req("POST", &format!("/v1/guests/{name}/{op}"), ""),
        Origin::Local,
    )
    .await
}

fn event_messages(a: &Arc<Agent>, guest: &str) -> Vec<String> {
    a.events
        .subscribe(0)
        .0
        .into_iter()
        .filter(|e| e.kind == "guest_state" && e.guest.as_deref() == Some(guest))
        .map(|e| e.message)
        .collect()
}

#[tokio::test]
async fn pause_resume_and_shutdown_move_a_real_vmm_through_its_states() {
    let Some(vmm) = vmm_for("pause_resume_and_shutdown_move_a_real_vmm_through_its_states") else {
        return;
    };
    let (a, _scratch) = vmm_agent(&vmm);
    call(&a, req("POST", "/v1/guests", PAYLOAD_GUEST), Origin::Local).await;
    let (s, e) = op(&a, "p", "pause").await;
    assert_eq!(
        (s, e["code"].as_str()),
        (StatusCode::CONFLICT, Some("invalid_guest_state")),
        "pausing a stopped guest: {e}"
    );
    let (s, g) = op(&a, "p", "start").await;
    assert_eq!(
        (s, g["state"].as_str()),
        (StatusCode::OK, Some("running")),
        "{g}"
    );
    wait_console(&a, "p", "ready").await;

    let (s, g) = op(&a, "p", "pause").await;
    assert_eq!(
        (s, g["state"].as_str()),
        (StatusCode::OK, Some("paused")),
        "{g}"
    );
    let (s, e) = op(&a, "p", "pause").await;
    assert_eq!(
        (s, e["code"].as_str()),
        (StatusCode::CONFLICT, Some("invalid_guest_state"))
    );
    let (s, g) = op(&a, "p", "resume").await;
    assert_eq!(
        (s, g["state"].as_str()),
        (StatusCode::OK, Some("running")),
        "{g}"
    );
    let (s, e) = op(&a, "p", "resume").await;
    assert_eq!(
        (s, e["code"].as_str()),
        (StatusCode::CONFLICT, Some("invalid_guest_state"))
    );

    let (s, stats) = call(&a, req("GET", "/v1/guests/p/stats", ""), Origin::Local).await;
    assert_eq!(
        (s, stats["memory_bytes"].as_u64()),
        (StatusCode::OK, Some(64 << 20)),
        "{stats}"
    );
    let (s, e) = call(&a, req("DELETE", "/v1/guests/p", ""), Origin::Local).await;
    assert_eq!(
        (s, e["code"].as_str()),
        (StatusCode::CONFLICT, Some("guest_running"))
    );

    // The spinning payload ignores ctrl-alt-del: after the timeout the agent stops it.
    let (s, g) = call(
        &a,
        req("POST", "/v1/guests/p/shutdown?timeout_secs=1", ""),
        Origin::Local,
    )
    .await;
    assert_eq!(
        (s, g["state"].as_str()),
        (StatusCode::OK, Some("shutting_down")),
        "{g}"
    );
    wait_guest(&a, "p", "stopped", |g| g["state"] == "stopped").await;
    assert_eq!(
        event_messages(&a, "p")[1..],
        ["paused", "running", "shutting_down", "stopped"],
        "{:?}",
        event_messages(&a, "p")
    );
}

#[tokio::test]
async fn reboot_starts_a_new_vmm_and_stop_waits_until_it_is_gone() {
    let Some(vmm) = vmm_for("reboot_starts_a_new_vmm_and_stop_waits_until_it_is_gone") else {
        return;
    };
    let (a, _scratch) = vmm_agent(&vmm);
    call(&a, req("POST", "/v1/guests", PAYLOAD_GUEST), Origin::Local).await;
    let (_, g) = op(&a, "p", "start").await;
    let first = g["pid"].as_u64().unwrap();
    wait_console(&a, "p", "ready").await;
    let (s, g) = call(
        &a,
        req("POST", "/v1/guests/p/reboot?timeout_secs=1", ""),
        Origin::Local,
    )
    .await;
    assert_eq!(
        (s, g["state"].as_str()),
        (StatusCode::OK, Some("shutting_down")),
        "{g}"
    );
    let g = wait_guest(&a, "p", "running again", |g| {
        g["state"] == "running" && g["pid"].as_u64().is_some_and(|p| p != first)
    })
    .await;
    wait_console(&a, "p", "ready").await;
    let (s, g2) = op(&a, "p", "stop").await;
    assert_eq!(
        (s, g2["state"].as_str()),
        (StatusCode::OK, Some("stopped")),
        "{g2}"
    );
    let second = g["pid"].as_u64().unwrap() as i32;
    assert!(
        !Path::new(&format!("/proc/{second}/exe")).exists(),
        "the VMM still runs after stop"
    );
    let (s, e) = op(&a, "p", "stop").await;
    assert_eq!(
        (s, e["code"].as_str()),
        (StatusCode::CONFLICT, Some("invalid_guest_state"))
    );
}

#[tokio::test]
async fn a_fresh_agent_reattaches_to_a_running_vmm_and_stops_it() {
    let Some(vmm) = vmm_for("a_fresh_agent_reattaches_to_a_running_vmm_and_stops_it") else {
        return;
    };
    let (a, scratch) = vmm_agent(&vmm);
    let root = &scratch.0;
    call(&a, req("POST", "/v1/guests", PAYLOAD_GUEST), Origin::Local).await;
    // The VMM as a previous agent left it: its own process, its files in the run dir.
    let dir = root.join("run/vms/p");
    std::fs::create_dir_all(&dir).unwrap();
    let config = hvnode_api::vmm::VmConfig {
        name: "p".into(),
        vcpus: 1,
        memory_mib: 64,
        kernel: root.join("images/payload.elf").display().to_string(),
        initrd: None,
        cmdline: String::new(),
        disks: Vec::new(),
        nets: Vec::new(),
        rng: false,
        serial_log: Some(dir.join("console.log").display().to_string()),
        serial_socket: None,
        control_socket: Some(dir.join("control.sock").display().to_string()),
        exit_file: Some(dir.join("exit.json").display().to_string()),
        jail: None,
    };
    std::fs::write(dir.join("vm.json"), serde_json::to_vec(&config).unwrap()).unwrap();
    let mut vmm_process = std::process::Command::new(&vmm)
        .arg("--config")
        .arg(dir.join("vm.json"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::fs::write(dir.join("pid"), vmm_process.id().to_string()).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !dir.join("control.sock").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the VMM never opened its control socket"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        guest_state(&a, "p").await["state"],
        "stopped",
        "not ours yet"
    );
    // Paused by the previous agent: the new one learns it from the VMM's description.
    let paused = guests::vmms::control(
        &dir.join("control.sock"),
        &hvnode_api::vmm::VmmRequest::Pause,
        Duration::from_secs(5),
    );
    assert!(
        matches!(paused, Ok(hvnode_api::vmm::VmmResponse::Ok)),
        "{paused:?}"
    );

    let fresh = Arc::new(Agent::new(a.paths.clone()).unwrap());
    let me = Arc::clone(&fresh);
    tokio::task::spawn_blocking(move || me.start_guests())
        .await
        .unwrap();
    let g = guest_state(&fresh, "p").await;
    assert_eq!(g["state"], "paused", "{g}");
    assert_eq!(g["pid"].as_u64(), Some(u64::from(vmm_process.id())));
    let (s, g) = op(&fresh, "p", "resume").await;
    assert_eq!(
        (s, g["state"].as_str()),
        (StatusCode::OK, Some("running")),
        "{g}"
    );
    // Ended behind the agent's back: not its child, so the pidfd tells it and the exit file
    // says how (0, stopped; without the file it would be a crash).
    let stopped = guests::vmms::control(
        &dir.join("control.sock"),
        &hvnode_api::vmm::VmmRequest::Stop,
        Duration::from_secs(5),
    );
    assert!(
        matches!(stopped, Ok(hvnode_api::vmm::VmmResponse::Ok)),
        "{stopped:?}"
    );
    wait_guest(&fresh, "p", "stopped", |g| g["state"] == "stopped").await;
    assert!(vmm_process.wait().unwrap().success());
    assert!(!dir.join("pid").exists());
    assert!(dir.join("exit.json").exists());

    // The agent's own stop of a reattached VMM.
    let a = Arc::new(Agent::new(a.paths.clone()).unwrap());
    let (_, g) = op(&a, "p", "start").await;
    assert_eq!(g["state"], "running", "{g}");
    let fresh = Arc::new(Agent::new(a.paths.clone()).unwrap());
    let me = Arc::clone(&fresh);
    tokio::task::spawn_blocking(move || me.start_guests())
        .await
        .unwrap();
    assert_eq!(guest_state(&fresh, "p").await["pid"], g["pid"]);
    let (s, g) = op(&fresh, "p", "stop").await;
    assert_eq!(
        (s, g["state"].as_str()),
        (StatusCode::OK, Some("stopped")),
        "{g}"
    );
}

#[tokio::test]
async fn stale_run_dirs_are_cleaned_and_a_crash_while_away_is_reported() {
    let (a, root) = agent();
    for name in ["gone", "crashy"] {
        let spec = format!(r#"{{"name":"{name}","kernel":"k","rng":false}}"#);
        call(&a, req("POST", "/v1/guests", &spec), Origin::Local).await;
    }
    let mut dead = std::process::Command::new("true").spawn().unwrap();
    let pid = dead.id().to_string();
    dead.wait().unwrap();
    let vms = root.join("run/vms");
    for name in ["gone", "crashy", "undefined"] {
        std::fs::create_dir_all(vms.join(name)).unwrap();
        std::fs::write(vms.join(name).join("pid"), &pid).unwrap();
        std::fs::write(vms.join(name).join("console.log"), "last words").unwrap();
    }
    std::fs::write(
        vms.join("crashy/exit.json"),
        r#"{"code":2,"reason":"vCPU 0: KVM_EXIT_INTERNAL_ERROR"}"#,
    )
    .unwrap();
    std::fs::write(
        vms.join("gone/exit.json"),
        r#"{"code":0,"reason":"powered off"}"#,
    )
    .unwrap();
    a.start_guests();
    assert_eq!(guest_state(&a, "gone").await["state"], "stopped");
    let crashy = guest_state(&a, "crashy").await;
    assert_eq!(crashy["state"], "crashed");
    assert_eq!(
        crashy["crash_reason"], "vCPU 0: KVM_EXIT_INTERNAL_ERROR",
        "{crashy}"
    );
    assert!(guest_state(&a, "gone").await.get("crash_reason").is_none());
    assert!(event_messages(&a, "crashy")
        .iter()
        .any(|m| m.contains("KVM_EXIT_INTERNAL_ERROR")));
    assert!(
        !vms.join("undefined").exists(),
        "a dir of no guest is removed"
    );
    assert!(!vms.join("gone/pid").exists());
    assert!(
        vms.join("crashy/console.log").exists(),
        "logs stay for the admin"
    );
    // A guest defined anew under a crashed guest's name starts out stopped.
    call(&a, req("DELETE", "/v1/guests/crashy", ""), Origin::Local).await;
    let spec = r#"{"name":"crashy","kernel":"k","rng":false}"#;
    call(&a, req("POST", "/v1/guests", spec), Origin::Local).await;
    assert_eq!(guest_state(&a, "crashy").await["state"], "stopped");
    let _ = std::fs::remove_dir_all(&root);
}

#[tokio::test]
async fn a_nic_on_a_missing_bridge_is_refused_naming_the_bridge() {
    let (a, root) = agent();
    std::fs::create_dir_all(root.join("images")).unwrap();
    std::fs::write(root.join("images/k"), b"x").unwrap();
    let spec = r#"{"name":"n","kernel":"k","rng":false,"nics":[{"bridge":"nosuchbr7"}]}"#;
    call(&a, req("POST", "/v1/guests", spec), Origin::Local).await;
    let (s, e) = op(&a, "n", "start").await;
    assert_eq!(
        (s, e["code"].as_str()),
        (StatusCode::CONFLICT, Some("bridge_not_found"))
    );
    assert!(e["message"].as_str().unwrap().contains("nosuchbr7"), "{e}");
    let _ = std::fs::remove_dir_all(&root);
}

#[tokio::test]
async fn autostart_starts_marked_guests_once_per_boot_and_survives_one_failing() {
    let Some(vmm) =
        vmm_for("autostart_starts_marked_guests_once_per_boot_and_survives_one_failing")
    else {
        return;
    };
    let (a, _scratch) = vmm_agent(&vmm);
    let broken = r#"{"name":"broken","kernel":"missing.elf","rng":false,"autostart":true}"#;
    let auto =
        r#"{"name":"p","kernel":"payload.elf","memory_mib":64,"rng":false,"autostart":true}"#;
    let manual = r#"{"name":"manual","kernel":"payload.elf","memory_mib":64,"rng":false}"#;
    for spec in [broken, auto, manual] {
        call(&a, req("POST", "/v1/guests", spec), Origin::Local).await;
    }
    let me = Arc::clone(&a);
    tokio::task::spawn_blocking(move || me.start_guests())
        .await
        .unwrap();
    assert_eq!(guest_state(&a, "p").await["state"], "running");
    assert_eq!(guest_state(&a, "manual").await["state"], "stopped");
    assert_eq!(guest_state(&a, "broken").await["state"], "stopped");
    let failures: Vec<_> = a
        .events
        .subscribe(0)
        .0
        .into_iter()
        .filter(|e| e.kind == "guest_autostart" && e.guest.as_deref() == Some("broken"))
        .collect();
    assert!(
        failures[0].message.contains("autostart failed"),
        "{failures:?}"
    );
    assert_eq!(op(&a, "p", "stop").await.0, StatusCode::OK);
    // An agent restart on the same boot: the marker in the run dir says it is not the first.
    let fresh = Arc::new(Agent::new(a.paths.clone()).unwrap());
    let me = Arc::clone(&fresh);
    tokio::task::spawn_blocking(move || me.start_guests())
        .await
        .unwrap();
    assert_eq!(guest_state(&fresh, "p").await["state"], "stopped");
}

/// After `ready`, echoes every serial input byte: `1: mov dx, 0x3fd; in al, dx; test al, 1;
/// jz 1b; mov dx, 0x3f8; in al, dx; out dx, al; jmp 1b`.
const SERIAL_ECHO: [u8; 17] = [
    0x66, 0xba, 0xfd, 0x03, 0xec, 0xa8, 0x01, 0x74, 0xf7, 0x66, 0xba, 0xf8, 0x03, 0xec, 0xee, 0xeb,
    0xef,
];

fn attach_req(name: &str, upgrade: bool) -> Request<Full<Bytes>> {
    let mut b = Request::builder()
        .method("GET")
        .uri(format!("/v1/guests/{name}/console/attach"))
        .header("host", "localhost");
    if upgrade {
        b = b
            .header("connection", "Upgrade")
            .header("upgrade", CONSOLE_PROTOCOL);
    }
    b.body(Full::new(Bytes::new())).unwrap()
}

/// Reads from `io` until `want` has appeared, for at most 20 s; returns everything read.
async fn read_until<R: tokio::io::AsyncRead + Unpin>(io: &mut R, want: &str) -> String {
    use tokio::io::AsyncReadExt;
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !String::from_utf8_lossy(&seen).contains(want) {
        let mut buf = [0u8; 256];
        let n = tokio::time::timeout_at(deadline, io.read(&mut buf))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{want:?} never came, got {:?}",
                    String::from_utf8_lossy(&seen)
                )
            })
            .unwrap();
        assert!(
            n > 0,
            "closed before {want:?}: {:?}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&seen).into_owned()
}

#[tokio::test]
async fn console_attach_refuses_unknown_stopped_and_plain_requests() {
    let (a, _root) = agent();
    let (s, e) = call(&a, attach_req("nope", true), Origin::Local).await;
    assert_eq!(
        (s, e["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("guest_not_found"))
    );
    call(&a, req("POST", "/v1/guests", PAYLOAD_GUEST), Origin::Local).await;
    let (s, e) = call(&a, attach_req("p", true), Origin::Local).await;
    assert_eq!(
        (s, e["code"].as_str()),
        (StatusCode::CONFLICT, Some("invalid_guest_state")),
        "{e}"
    );
    let (s, e) = call(&a, attach_req("p", true), ANON).await;
    assert_eq!(
        s,
        StatusCode::FORBIDDEN,
        "unregistered TCP clients cannot attach: {e}"
    );
}

#[tokio::test]
async fn console_attach_carries_input_to_a_real_guest_and_its_echo_back() {
    let Some(vmm) = vmm_for("console_attach_carries_input_to_a_real_guest_and_its_echo_back")
    else {
        return;
    };
    use tokio::io::AsyncWriteExt;
    let (a, scratch) = vmm_agent(&vmm);
    let mut code = hvnode_vmm::payload::serial_print("ready\n");
    code.extend_from_slice(&SERIAL_ECHO);
    std::fs::write(
        scratch.0.join("images/payload.elf"),
        hvnode_vmm::payload::elf64(&code),
    )
    .unwrap();
    call(&a, req("POST", "/v1/guests", PAYLOAD_GUEST), Origin::Local).await;
    let (s, g) = op(&a, "p", "start").await;
    assert_eq!(s, StatusCode::OK, "{g}");
    wait_console(&a, "p", "ready").await;

    // A plain GET of the attach route is refused before anything is upgraded.
    let (s, e) = call(&a, attach_req("p", false), Origin::Local).await;
    assert_eq!(
        (s, e["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("upgrade_required")),
        "{e}"
    );

    // Upgrades need a real connection: serve the agent on a unix socket as main.rs does.
    let sock = scratch.0.join("agent.sock");
    let listener = tokio::net::UnixListener::bind(&sock).unwrap();
    let server = Arc::clone(&a);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(Arc::clone(&server).serve_connection(
                stream,
                Origin::Local,
                crate::listen::Limits::default().head,
            ));
        }
    });
    let stream = tokio::net::UnixStream::connect(&sock).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn.with_upgrades());
    let resp = sender.send_request(attach_req("p", true)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(resp.headers()["upgrade"], CONSOLE_PROTOCOL);
    let mut io = hyper_util::rt::TokioIo::new(hyper::upgrade::on(resp).await.unwrap());
    // The replayed log shows what the guest printed before the attach.
    read_until(&mut io, "ready\n").await;
    io.write_all(b"hello").await.unwrap();
    io.flush().await.unwrap();
    let echoed = read_until(&mut io, "hello").await;
    assert!(!echoed.contains("ready"), "replayed twice: {echoed:?}");

    // Stopping the guest closes the attached connection.
    let (s, g) = op(&a, "p", "stop").await;
    assert_eq!(s, StatusCode::OK, "{g}");
    let mut rest = Vec::new();
    let n = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read_to_end(&mut io, &mut rest),
    )
    .await
    .expect("the console connection stays open after the guest stopped");
    assert!(n.is_ok(), "{n:?}");
}

#[test]
fn console_replay_starts_at_a_line_and_keeps_a_short_log_whole() {
    let root = scratch_root();
    std::fs::create_dir_all(&root).unwrap();
    let log = root.join("console.log");
    std::fs::write(&log, b"first\nsecond\nprompt$ ").unwrap();
    assert_eq!(console_tail(&log, 100), b"first\nsecond\nprompt$ ");
    // 12 bytes from the end start inside "second": the replay begins after its newline.
    assert_eq!(console_tail(&log, 12), b"prompt$ ");
    assert_eq!(console_tail(&root.join("missing.log"), 100), b"");
    let _ = std::fs::remove_dir_all(&root);
}

/// A request on the local socket: its status and JSON body.
async fn local(
    a: &Arc<Agent>,
    method: &str,
    path: &str,
    body: &str,
) -> (StatusCode, serde_json::Value) {
    call(a, req(method, path, body), Origin::Local).await
}

/// Snapshots through the API on the real VMM: taken of a running guest (which runs on), listed,
/// refused twice under one name and while the guest has no VMM, restored into a new VMM after a
/// stop, refused for a definition that no longer fits, deleted, and gone with their guest.
#[tokio::test]
async fn snapshots_are_taken_listed_restored_refused_when_they_do_not_fit_and_deleted() {
    let Some(vmm) =
        vmm_for("snapshots_are_taken_listed_restored_refused_when_they_do_not_fit_and_deleted")
    else {
        return;
    };
    let (a, scratch) = vmm_agent(&vmm);
    local(&a, "POST", "/v1/guests", PAYLOAD_GUEST).await;
    let snap = |name: &str| format!(r#"{{"name":"{name}"}}"#);
    let (s, e) = local(&a, "POST", "/v1/guests/p/snapshots", &snap("s1")).await;
    assert_eq!(
        (s, e["code"].as_str()),
        (StatusCode::CONFLICT, Some("invalid_guest_state")),
        "a snapshot needs a VMM: {e}"
    );
    op(&a, "p", "start").await;
    wait_console(&a, "p", "ready").await;

    let (s, taken) = local(&a, "POST", "/v1/guests/p/snapshots", &snap("s1")).await;
    assert_eq!(s, StatusCode::CREATED, "{taken}");
    assert_eq!(taken["memory_bytes"], 64u64 << 20);
    assert!(
        taken["disk_bytes"].as_u64().unwrap() < 64 << 20,
        "memory holes take no space: {taken}"
    );
    assert_eq!(
        guest_state(&a, "p").await["state"],
        "running",
        "the guest runs on"
    );
    let (s, e) = local(&a, "POST", "/v1/guests/p/snapshots", &snap("s1")).await;
    assert_eq!(
        (s, e["code"].as_str()),
        (StatusCode::CONFLICT, Some("snapshot_exists"))
    );
    let (s, e) = local(&a, "POST", "/v1/guests/p/snapshots", &snap("No Good")).await;
    assert_eq!(
        (s, e["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_snapshot_name"))
    );
    let (_, list) = local(&a, "GET", "/v1/guests/p/snapshots", "").await;
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(
        guest_state(&a, "p").await["snapshots"],
        serde_json::json!(["s1"])
    );

    let (s, e) = local(&a, "POST", "/v1/guests/p/snapshots/s1/restore", "").await;
    assert_eq!(
        (s, e["code"].as_str()),
        (StatusCode::CONFLICT, Some("guest_running")),
        "{e}"
    );
    op(&a, "p", "stop").await;
    let (s, g) = local(&a, "POST", "/v1/guests/p/snapshots/s1/restore", "").await;
    assert_eq!(
        (s, g["state"].as_str()),
        (StatusCode::OK, Some("running")),
        "{g}"
    );
    let (s, stats) = local(&a, "GET", "/v1/guests/p/stats", "").await;
    assert_eq!(s, StatusCode::OK, "the restored VMM answers: {stats}");
    let restored = a
        .events
        .subscribe(0)
        .0
        .into_iter()
        .any(|e| e.kind == "snapshot" && e.message == "restored from snapshot s1");
    assert!(restored, "no snapshot event for the restore");
    assert!(event_messages(&a, "p")
        .iter()
        .any(|m| m.contains("restored from")));
    op(&a, "p", "stop").await;

    let bigger = PAYLOAD_GUEST.replace("\"memory_mib\":64", "\"memory_mib\":128");
    let (s, _) = local(&a, "PUT", "/v1/guests/p", &bigger).await;
    assert_eq!(s, StatusCode::OK);
    let (s, e) = local(&a, "POST", "/v1/guests/p/snapshots/s1/restore", "").await;
    assert_eq!(
        (s, e["code"].as_str()),
        (StatusCode::CONFLICT, Some("snapshot_mismatch")),
        "{e}"
    );
    assert!(e["message"].as_str().unwrap().contains("64 MiB"), "{e}");

    let (s, _) = local(&a, "DELETE", "/v1/guests/p/snapshots/s1", "").await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, e) = local(&a, "GET", "/v1/guests/p/snapshots/s1", "").await;
    assert_eq!(
        (s, e["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("snapshot_not_found"))
    );

    op(&a, "p", "start").await;
    local(&a, "POST", "/v1/guests/p/snapshots", &snap("s2")).await;
    op(&a, "p", "stop").await;
    local(&a, "DELETE", "/v1/guests/p", "").await;
    assert!(
        !scratch.0.join("data/snapshots/p").exists(),
        "a deleted guest's snapshots go with it"
    );
}

/// Runs `promtool check metrics` (a real Prometheus parser, with its lint) on `text`.
fn promtool_check(test: &str, text: &str) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            hvnode_base::testing::cannot_run(test, "no promtool (Debian package prometheus)");
            return;
        }
        Err(e) => panic!("running promtool: {e}"),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics refused the text: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The value of `series` (name and labels as the text spells them) in a scrape.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

async fn scrape(a: &Arc<Agent>) -> String {
    let resp = a.handle(req("GET", "/metrics", ""), Origin::Local).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(body.to_vec()).unwrap()
}

#[test]
fn metrics_cover_states_answering_and_silent_vmms_and_pass_promtool() {
    let guest = |name: &str, state: &str, pid: Option<u32>| -> hvnode_api::guest::GuestStatus {
        serde_json::from_value(serde_json::json!({
            "spec": {"name": name, "kernel": "k", "memory_mib": 64},
            "state": state, "pid": pid, "uptime_secs": pid.map(|_| 7),
        }))
        .unwrap()
    };
    let guests = [
        guest("a", "running", Some(10)),
        guest("b", "paused", Some(11)),
        guest("c", "stopped", None),
    ];
    let stats = hvnode_api::vmm::VmStats {
        vcpu_exits: vec![
            [("io".to_owned(), 5), ("hlt".to_owned(), 2)].into(),
            [("io".to_owned(), 0)].into(),
        ],
        devices: [
            (
                "virtio-blk0".to_owned(),
                [("requests".to_owned(), 3), ("read_bytes".to_owned(), 4096)].into(),
            ),
            (
                // Names come from the VMM: quotes and backslashes must come out escaped.
                "odd\"dev\\".to_owned(),
                [("tx_bytes".to_owned(), 1)].into(),
            ),
        ]
        .into(),
        memory_bytes: 64 << 20,
        rss_bytes: 1 << 20,
    };
    let vmms = [("a".to_owned(), Some(stats)), ("b".to_owned(), None)].into();
    let node = hvnode_api::node::NodeStats {
        cpu_percent: 12.5,
        memory_used_bytes: 1000,
        memory_total_bytes: 4000,
        load: [0.0; 3],
        guests_total: 3,
        guests_running: 2,
        uptime_secs: 99,
    };
    let text = node::metrics::encode(&node, &guests, &vmms);
    for (series, value) in [
        (
            format!("hvnode_build_info{{version=\"{}\"}}", hvnode_api::VERSION),
            1.0,
        ),
        ("node_cpu_percent".into(), 12.5),
        ("node_memory_used_bytes".into(), 1000.0),
        ("node_memory_total_bytes".into(), 4000.0),
        ("node_uptime_seconds".into(), 99.0),
        ("hvnode_guests{state=\"defined\"}".into(), 3.0),
        ("hvnode_guests{state=\"running\"}".into(), 1.0),
        ("hvnode_guests{state=\"paused\"}".into(), 1.0),
        ("hvnode_guests{state=\"stopped\"}".into(), 1.0),
        ("hvnode_guests{state=\"crashed\"}".into(), 0.0),
        ("hvnode_guest_up{guest=\"a\"}".into(), 1.0),
        ("hvnode_guest_up{guest=\"b\"}".into(), 1.0),
        ("hvnode_guest_stats_up{guest=\"a\"}".into(), 1.0),
        ("hvnode_guest_stats_up{guest=\"b\"}".into(), 0.0),
        ("hvnode_guest_uptime_seconds{guest=\"b\"}".into(), 7.0),
        ("hvnode_guest_memory_bytes{guest=\"a\"}".into(), 67108864.0),
        ("hvnode_guest_vmm_rss_bytes{guest=\"a\"}".into(), 1048576.0),
        (
            "hvnode_guest_vcpu_exits_total{guest=\"a\",vcpu=\"0\",reason=\"io\"}".into(),
            5.0,
        ),
        (
            "hvnode_guest_vcpu_exits_total{guest=\"a\",vcpu=\"1\",reason=\"io\"}".into(),
            0.0,
        ),
        (
            "hvnode_guest_device_total{guest=\"a\",device=\"virtio-blk0\",counter=\"read_bytes\"}"
                .into(),
            4096.0,
        ),
        (
            "hvnode_guest_device_total{guest=\"a\",device=\"odd\\\"dev\\\\\",counter=\"tx_bytes\"}"
                .into(),
            1.0,
        ),
    ] {
        assert_eq!(sample(&text, &series), Some(value), "{series} in:\n{text}");
    }
    // A silent VMM's counters are left out; a guest without a VMM has no series at all.
    assert!(
        !text.contains("hvnode_guest_memory_bytes{guest=\"b\"}"),
        "{text}"
    );
    assert!(!text.contains("guest=\"c\""), "{text}");
    promtool_check(
        "metrics_cover_states_answering_and_silent_vmms_and_pass_promtool",
        &text,
    );
}

#[tokio::test]
async fn metrics_show_a_real_guests_counters_skip_a_stuck_vmm_in_time_and_drop_a_stopped_guest() {
    const TEST: &str =
        "metrics_show_a_real_guests_counters_skip_a_stuck_vmm_in_time_and_drop_a_stopped_guest";
    let Some(vmm) = vmm_for(TEST) else {
        return;
    };
    let (a, _scratch) = vmm_agent(&vmm);
    call(&a, req("POST", "/v1/guests", PAYLOAD_GUEST), Origin::Local).await;
    let (_, g) = op(&a, "p", "start").await;
    wait_console(&a, "p", "ready").await;

    let text = scrape(&a).await;
    assert_eq!(sample(&text, "hvnode_guests{state=\"running\"}"), Some(1.0));
    assert_eq!(sample(&text, "hvnode_guest_up{guest=\"p\"}"), Some(1.0));
    assert_eq!(
        sample(&text, "hvnode_guest_stats_up{guest=\"p\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "hvnode_guest_memory_bytes{guest=\"p\"}"),
        Some((64u64 << 20) as f64)
    );
    assert!(
        sample(&text, "hvnode_guest_vmm_rss_bytes{guest=\"p\"}").is_some_and(|v| v > 0.0),
        "{text}"
    );
    // "ready\n" went out byte by byte through the serial port's I/O port.
    assert!(
        sample(
            &text,
            "hvnode_guest_vcpu_exits_total{guest=\"p\",vcpu=\"0\",reason=\"io\"}"
        )
        .is_some_and(|v| v >= 6.0),
        "{text}"
    );
    assert!(
        sample(
            &text,
            "hvnode_guest_device_total{guest=\"p\",device=\"serial\",counter=\"tx_bytes\"}"
        )
        .is_some_and(|v| v >= 6.0),
        "{text}"
    );
    promtool_check(TEST, &text);

    // A VMM that cannot answer costs the scrape its bounded wait, not the control timeouts.
    let pid = nix::unistd::Pid::from_raw(g["pid"].as_i64().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let t = std::time::Instant::now();
    let text = scrape(&a).await;
    let took = t.elapsed();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    assert!(
        took < node::metrics::VMM_STATS_WAIT + Duration::from_secs(1),
        "the scrape took {took:?}"
    );
    assert_eq!(sample(&text, "hvnode_guest_up{guest=\"p\"}"), Some(1.0));
    assert_eq!(
        sample(&text, "hvnode_guest_stats_up{guest=\"p\"}"),
        Some(0.0)
    );
    assert!(
        !text.contains("hvnode_guest_vcpu_exits_total{guest=\"p\""),
        "{text}"
    );
    promtool_check(TEST, &text);

    let (s, g) = op(&a, "p", "stop").await;
    assert_eq!(s, StatusCode::OK, "{g}");
    let text = scrape(&a).await;
    assert!(!text.contains("guest=\"p\""), "{text}");
    assert_eq!(sample(&text, "hvnode_guests{state=\"stopped\"}"), Some(1.0));
    assert_eq!(sample(&text, "hvnode_guests{state=\"running\"}"), Some(0.0));
}
