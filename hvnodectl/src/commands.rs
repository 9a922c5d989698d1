//! The commands: each talks to the state directory and, through [`NodeClient`], to nodes.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, StreamBody};
use hvnode_api::event::Event;
use hvnode_api::fingerprint::{self, FingerprintError};
use hvnode_api::guest::{self, GuestSpec, GuestSpecError, GuestState, GuestStatus};
use hvnode_api::node::{Hostname, NodeInfo, NodeStats, PowerAction};
use hvnode_api::registration::{JoinState, PairRequest, RegistrationStatus};
use hvnode_api::routes::{GuestAction, Route, CONSOLE_PROTOCOL};
use hvnode_api::sse;
use hvnode_api::units::{bytes as human_bytes, secs as human_secs};
use hyper::body::Frame;
use hyper::Method;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

use crate::attach;
use crate::cli::{Command, GuestCommand, ImageCommand, NodeCommand, PowerArg, WaitState};
use crate::client::{self, ClientError, NodeClient, ReqBody};
use crate::serve::{self, ServeError};
use crate::state::{self, JoinRecord, NodeEntry, StateDir, StateError};

/// Errors of the commands.
#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    /// The interactive console.
    #[error(transparent)]
    Attach(#[from] attach::AttachError),
    /// State directory.
    #[error(transparent)]
    State(#[from] StateError),
    /// Talking to a node.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The manager server.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// A fingerprint argument.
    #[error(transparent)]
    Fingerprint(#[from] FingerprintError),
    /// The node is not in nodes.toml.
    #[error("Unknown node {0:?}: see `hvnodectl nodes`, or register it first")]
    UnknownNode(String),
    /// The name is taken.
    #[error("A node named {0:?} is already registered here: unregister it first, pass --replace, or choose another name")]
    NodeExists(String),
    /// The node presented another certificate than the admin expected.
    #[error("node certificate fingerprint is {actual}, expected {expected}: this is not the node you meant; compare with the fingerprint on its console")]
    FingerprintDiffers {
        /// What the node presented.
        actual: String,
        /// What the admin gave.
        expected: String,
    },
    /// The node's certificate and the fingerprint it reports disagree.
    #[error("node reports fingerprint {reported} but presented a certificate with fingerprint {presented}: something is between you and the node")]
    Inconsistent {
        /// In the RegistrationStatus.
        reported: String,
        /// Of the TLS certificate.
        presented: String,
    },
    /// The admin did not confirm.
    #[error("Registration cancelled: the node fingerprint was not confirmed")]
    NotConfirmed,
    /// A local file.
    #[error("Cannot read {0}")]
    ReadFile(PathBuf, #[source] std::io::Error),
    /// A guest definition file could not be parsed.
    #[error("Cannot parse guest definition {0}: {1}")]
    ParseSpec(PathBuf, String),
    /// A guest definition or name is invalid.
    #[error(transparent)]
    Spec(#[from] GuestSpecError),
    /// No join request matches.
    #[error("No join request matches {0:?}: see `hvnodectl requests`")]
    RequestNotFound(String),
    /// Several join requests from one host.
    #[error("Several join requests come from host {0:?}: give the fingerprint instead")]
    AmbiguousRequest(String),
    /// The request was decided already.
    #[error("The join request from {hostname} was already {state}")]
    AlreadyDecided {
        /// Host name of the node.
        hostname: String,
        /// `approved` or `rejected`.
        state: String,
    },
    /// `wait` timed out.
    #[error("Guest {guest} did not reach state {wanted} within {secs} s (it is {last})")]
    WaitTimeout {
        /// Guest name.
        guest: String,
        /// State waited for.
        wanted: String,
        /// Timeout.
        secs: u64,
        /// Last state seen.
        last: String,
    },
    /// The event stream ended.
    #[error("The node closed the event stream")]
    StreamEnded,
    /// Writing to stdout failed.
    #[error("Cannot write the output")]
    Output(#[source] std::io::Error),
}

/// Shared settings of a run.
#[derive(Debug)]
pub struct Ctx {
    /// The state directory.
    pub state: StateDir,
    /// Print raw JSON.
    pub json: bool,
}

/// A file of the node's image directory (`GET /v1/images`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ImageFile {
    path: String,
    size_bytes: u64,
}

fn out(text: &str) -> Result<(), CmdError> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| {
            if text.ends_with('\n') || text.is_empty() {
                Ok(())
            } else {
                stdout.write_all(b"\n")
            }
        })
        .and_then(|()| stdout.flush())
        .map_err(CmdError::Output)
}

fn out_raw(bytes: &[u8]) -> Result<(), CmdError> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(bytes)
        .and_then(|()| {
            if bytes.ends_with(b"\n") || bytes.is_empty() {
                Ok(())
            } else {
                stdout.write_all(b"\n")
            }
        })
        .and_then(|()| stdout.flush())
        .map_err(CmdError::Output)
}

/// A guest action's path, with the node's `timeout_secs` parameter when given.
fn guest_action_path(name: &str, action: GuestAction, timeout: Option<u64>) -> String {
    let route = Route::GuestAction(name.to_owned(), action);
    match timeout {
        Some(t) => route.with_query(&[("timeout_secs", &t.to_string())]),
        None => route.path(),
    }
}

fn state_name<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

/// Reads and validates a guest definition file.
pub fn read_spec(path: &Path) -> Result<GuestSpec, CmdError> {
    let text = std::fs::read_to_string(path).map_err(|e| CmdError::ReadFile(path.to_owned(), e))?;
    let spec: GuestSpec =
        toml::from_str(&text).map_err(|e| CmdError::ParseSpec(path.to_owned(), e.to_string()))?;
    spec.validate()?;
    Ok(spec)
}

impl Ctx {
    /// A client of a registered node: pinned fingerprint and client certificate.
    pub fn client(&self, node: &str) -> Result<NodeClient, CmdError> {
        let entry = self
            .state
            .node(node)?
            .ok_or_else(|| CmdError::UnknownNode(node.to_owned()))?;
        self.client_for(node, &entry)
    }

    fn client_for(&self, node: &str, entry: &NodeEntry) -> Result<NodeClient, CmdError> {
        let identity = self.state.client_identity()?;
        Ok(NodeClient::new(
            node,
            &entry.url,
            Some(entry.fingerprint.clone()),
            Some(identity),
        )?)
    }

    fn connecting(&self, c: &NodeClient) {
        eprintln!("connecting to {}", c.url());
    }

    /// Runs one command.
    pub async fn run(&self, command: Command) -> Result<(), CmdError> {
        match command {
            Command::Init { name, sans } => self.init(&name, &sans),
            Command::Ca => self.ca(),
            Command::Register {
                node,
                url,
                code,
                fingerprint,
                yes,
                replace,
            } => {
                self.register(&node, &url, &code, fingerprint.as_deref(), yes, replace)
                    .await
            }
            Command::Serve { listen, sans } => {
                self.state.manager()?;
                if self.state.ensure_server_names(&sans)? {
                    eprintln!("server certificate re-issued with names {sans:?}");
                }
                Ok(serve::run(self.state.clone(), listen).await?)
            }
            Command::Requests => self.requests(),
            Command::Approve { request, name, url } => {
                self.approve(&request, &name, url.as_deref())
            }
            Command::Reject { request } => self.reject(&request),
            Command::Nodes => self.nodes().await,
            Command::Unregister { node, force } => self.unregister(&node, force).await,
            Command::Node(cmd) => self.node_cmd(cmd).await,
            Command::Guest(cmd) => self.guest_cmd(cmd).await,
            Command::Image(cmd) => self.image_cmd(cmd).await,
            Command::Events { node, since, count } => self.events(&node, since, count).await,
            Command::Wait {
                node,
                guest,
                state,
                timeout,
            } => self.wait(&node, &guest, state, timeout).await,
        }
    }

    fn init(&self, name: &str, sans: &[String]) -> Result<(), CmdError> {
        let info = self.state.init(name, sans)?;
        let fp = self.state.ca_fingerprint()?;
        if self.json {
            return out(&serde_json::json!({
                "name": info.name,
                "state_dir": self.state.root(),
                "ca_fingerprint": fp,
                "ca_pem_path": self.state.ca_cert_path(),
            })
            .to_string());
        }
        out(&format!(
            "created manager {:?} in {}\nCA fingerprint: {fp}\nserver names: {}",
            info.name,
            self.state.root().display(),
            info.server_names.join(", ")
        ))
    }

    fn ca(&self) -> Result<(), CmdError> {
        let info = self.state.manager()?;
        let fp = self.state.ca_fingerprint()?;
        if self.json {
            return out(&serde_json::json!({
                "name": info.name,
                "ca_fingerprint": fp,
                "ca_pem_path": self.state.ca_cert_path(),
            })
            .to_string());
        }
        out(&format!(
            "manager: {}\nCA fingerprint: {fp}\nCA certificate: {}",
            info.name,
            self.state.ca_cert_path().display()
        ))
    }

    async fn register(
        &self,
        node: &str,
        url: &str,
        code: &str,
        expected: Option<&str>,
        yes: bool,
        replace: bool,
    ) -> Result<(), CmdError> {
        let info = self.state.manager()?;
        let mut nodes = self.state.load_nodes()?;
        if nodes.nodes.contains_key(node) && !replace {
            return Err(CmdError::NodeExists(node.to_owned()));
        }
        let expected = expected.map(fingerprint::normalize).transpose()?;
        let probe = NodeClient::new(node, url, None, None)?;
        self.connecting(&probe);
        let (status, _): (RegistrationStatus, _) =
            probe.get_json(&Route::Registration.path()).await?;
        let presented = probe
            .seen_fingerprint()
            .ok_or_else(|| CmdError::Inconsistent {
                reported: status.node_fingerprint.clone(),
                presented: "none".into(),
            })?;
        if fingerprint::normalize(&status.node_fingerprint)
            .ok()
            .as_deref()
            != Some(presented.as_str())
        {
            return Err(CmdError::Inconsistent {
                reported: status.node_fingerprint,
                presented,
            });
        }
        eprintln!(
            "node fingerprint: {presented} (state: {})",
            state_name(&status.state)
        );
        match expected {
            Some(exp) if exp != presented => {
                return Err(CmdError::FingerprintDiffers {
                    actual: presented,
                    expected: exp,
                })
            }
            Some(_) => {}
            None if yes => {}
            None => {
                eprint!("Does this fingerprint match the one on the node's console? [y/N] ");
                let _ = std::io::stderr().flush();
                let mut answer = String::new();
                std::io::stdin()
                    .lock()
                    .read_line(&mut answer)
                    .map_err(|e| CmdError::ReadFile("stdin".into(), e))?;
                if !matches!(answer.trim(), "y" | "Y" | "yes" | "Yes") {
                    return Err(CmdError::NotConfirmed);
                }
            }
        }
        let pinned = NodeClient::new(node, url, Some(presented.clone()), None)?;
        let req = PairRequest {
            code: code.trim().to_owned(),
            manager_name: info.name.clone(),
            ca_pem: self.state.ca_pem()?,
        };
        let (answer, raw): (RegistrationStatus, _) = pinned
            .send_json(Method::POST, &Route::Registration.path(), Some(&req))
            .await?;
        let entry = NodeEntry {
            url: pinned.url().to_owned(),
            fingerprint: presented,
            registered_at: state::now(),
        };
        nodes.nodes.insert(node.to_owned(), entry.clone());
        self.state.save_nodes(&nodes)?;
        eprintln!("registered");
        // Prove the client certificate is accepted now.
        let check = self.client_for(node, &entry)?;
        let _: (NodeInfo, _) = check.get_json(&Route::Node.path()).await?;
        if self.json {
            return out_raw(&raw);
        }
        out(&format!(
            "node {node} at {} registered with manager {:?} (state: {})",
            entry.url,
            info.name,
            state_name(&answer.state)
        ))
    }

    fn find_request(&self, key: &str) -> Result<JoinRecord, CmdError> {
        if fingerprint::looks_like(key) {
            let fp = fingerprint::normalize(key)?;
            return self
                .state
                .join_request(&fp)?
                .ok_or_else(|| CmdError::RequestNotFound(key.to_owned()));
        }
        let mut matches: Vec<JoinRecord> = self
            .state
            .join_requests()?
            .into_iter()
            .filter(|r| r.hostname == key)
            .collect();
        if matches.len() > 1 {
            // Prefer the single pending one when earlier requests were decided.
            let pending: Vec<JoinRecord> = matches
                .iter()
                .filter(|r| r.state == JoinState::Pending)
                .cloned()
                .collect();
            if pending.len() == 1 {
                return Ok(pending
                    .into_iter()
                    .next()
                    .unwrap_or_else(|| matches.remove(0)));
            }
            return Err(CmdError::AmbiguousRequest(key.to_owned()));
        }
        matches
            .pop()
            .ok_or_else(|| CmdError::RequestNotFound(key.to_owned()))
    }

    fn requests(&self) -> Result<(), CmdError> {
        let list = self.state.join_requests()?;
        if self.json {
            return out(&serde_json::to_string(&list).unwrap_or_default());
        }
        if list.is_empty() {
            return out("no join requests");
        }
        let mut text = format!(
            "{:<20} {:<9} {:<24} {:<12} {}\n",
            "HOSTNAME", "STATE", "URL", "NODE", "FINGERPRINT"
        );
        for r in &list {
            text.push_str(&format!(
                "{:<20} {:<9} {:<24} {:<12} {}\n",
                r.hostname,
                state_name(&r.state),
                r.default_url(),
                r.node_name.as_deref().unwrap_or("-"),
                r.fingerprint
            ));
        }
        out(&text)
    }

    fn approve(&self, key: &str, name: &str, url: Option<&str>) -> Result<(), CmdError> {
        let mut record = self.find_request(key)?;
        if record.state == JoinState::Approved {
            return Err(CmdError::AlreadyDecided {
                hostname: record.hostname,
                state: "approved".into(),
            });
        }
        let mut nodes = self.state.load_nodes()?;
        if nodes.nodes.contains_key(name) {
            return Err(CmdError::NodeExists(name.to_owned()));
        }
        let url = url
            .map(str::to_owned)
            .unwrap_or_else(|| record.default_url());
        client::parse_url(&url)?;
        let entry = NodeEntry {
            url: url.trim_end_matches('/').to_owned(),
            fingerprint: record.fingerprint.clone(),
            registered_at: state::now(),
        };
        // The node entry first: once the node sees "approved" it may be used at once.
        nodes.nodes.insert(name.to_owned(), entry.clone());
        self.state.save_nodes(&nodes)?;
        record.state = JoinState::Approved;
        record.node_name = Some(name.to_owned());
        self.state.save_join_request(&record)?;
        if self.json {
            return out(&serde_json::to_string(&record).unwrap_or_default());
        }
        out(&format!(
            "approved {} as node {name} at {}; it registers when it next polls the manager",
            record.hostname, entry.url
        ))
    }

    fn reject(&self, key: &str) -> Result<(), CmdError> {
        let mut record = self.find_request(key)?;
        if record.state != JoinState::Pending {
            return Err(CmdError::AlreadyDecided {
                hostname: record.hostname,
                state: state_name(&record.state),
            });
        }
        record.state = JoinState::Rejected;
        self.state.save_join_request(&record)?;
        if self.json {
            return out(&serde_json::to_string(&record).unwrap_or_default());
        }
        out(&format!(
            "rejected the join request from {}",
            record.hostname
        ))
    }

    async fn nodes(&self) -> Result<(), CmdError> {
        let nodes = self.state.load_nodes()?;
        let mut probes = Vec::new();
        for (name, entry) in &nodes.nodes {
            let client = self.client_for(name, entry)?;
            probes.push(async move {
                let reg = client
                    .get_json::<RegistrationStatus>(&Route::Registration.path())
                    .await;
                let info = client.get_json::<NodeInfo>(&Route::Node.path()).await;
                let stats = client.get_json::<NodeStats>(&Route::Stats.path()).await;
                (reg, info, stats)
            });
        }
        let results = futures_util::future::join_all(probes).await;
        let mut rows = Vec::new();
        for ((name, entry), (reg, info, stats)) in nodes.nodes.iter().zip(results) {
            let reachable = !matches!(reg, Err(ClientError::Unreachable { .. }));
            let state = match &reg {
                Ok((r, _)) => state_name(&r.state),
                Err(ClientError::Unreachable { .. }) => "-".into(),
                Err(ClientError::FingerprintMismatch { .. }) => "wrong certificate".into(),
                Err(e) => format!("error: {e}"),
            };
            let state = match (&info, state.as_str()) {
                (Err(ClientError::Untrusted { .. }), _) => "untrusted".into(),
                _ => state,
            };
            let error = reg
                .as_ref()
                .err()
                .or(info.as_ref().err())
                .or(stats.as_ref().err())
                .map(|e| e.to_string());
            let info = info.ok().map(|(i, _)| i);
            let stats = stats.ok().map(|(s, _)| s);
            rows.push(serde_json::json!({
                "name": name,
                "url": entry.url,
                "fingerprint": entry.fingerprint,
                "reachable": reachable,
                "state": state,
                "hostname": info.as_ref().map(|i| i.hostname.clone()),
                "guests_running": stats.as_ref().map(|s| s.guests_running),
                "guests_total": stats.as_ref().map(|s| s.guests_total),
                "error": error,
            }));
        }
        if self.json {
            return out(&serde_json::Value::Array(rows).to_string());
        }
        if rows.is_empty() {
            return out("no nodes registered");
        }
        let mut text = format!(
            "{:<16} {:<28} {:<10} {:<18} {:<20} {}\n",
            "NAME", "URL", "REACHABLE", "STATE", "HOSTNAME", "GUESTS"
        );
        for r in &rows {
            let guests = match (r["guests_running"].as_u64(), r["guests_total"].as_u64()) {
                (Some(run), Some(total)) => format!("{run}/{total}"),
                _ => "-".into(),
            };
            text.push_str(&format!(
                "{:<16} {:<28} {:<10} {:<18} {:<20} {}\n",
                r["name"].as_str().unwrap_or(""),
                r["url"].as_str().unwrap_or(""),
                if r["reachable"].as_bool() == Some(true) {
                    "yes"
                } else {
                    "no"
                },
                r["state"].as_str().unwrap_or(""),
                r["hostname"].as_str().unwrap_or("-"),
                guests
            ));
        }
        out(&text)
    }

    async fn unregister(&self, node: &str, force: bool) -> Result<(), CmdError> {
        let c = self.client(node)?;
        self.connecting(&c);
        let result = c
            .send_json_raw::<()>(Method::DELETE, &Route::Registration.path(), None)
            .await;
        let raw = match result {
            Ok(raw) => raw,
            Err(e) if force => {
                eprintln!("warning: {e}; forgetting the node anyway");
                Bytes::new()
            }
            Err(e) => return Err(e.into()),
        };
        let mut nodes = self.state.load_nodes()?;
        nodes.nodes.remove(node);
        self.state.save_nodes(&nodes)?;
        eprintln!("unregistered");
        if self.json {
            return out_raw(&raw);
        }
        out(&format!(
            "node {node} unregistered and removed from nodes.toml"
        ))
    }

    async fn node_cmd(&self, cmd: NodeCommand) -> Result<(), CmdError> {
        match cmd {
            NodeCommand::Info(a) => {
                let c = self.client(&a.node)?;
                self.connecting(&c);
                let (i, raw): (NodeInfo, _) = c.get_json(&Route::Node.path()).await?;
                if self.json {
                    return out_raw(&raw);
                }
                out(&format_node_info(&i))
            }
            NodeCommand::Stats(a) => {
                let c = self.client(&a.node)?;
                self.connecting(&c);
                let (s, raw): (NodeStats, _) = c.get_json(&Route::Stats.path()).await?;
                if self.json {
                    return out_raw(&raw);
                }
                out(&format!(
                    "cpu: {:.1}%\nmemory: {} of {}\nload: {:.2} {:.2} {:.2}\nguests: {} running of {}\nuptime: {}",
                    s.cpu_percent,
                    human_bytes(s.memory_used_bytes),
                    human_bytes(s.memory_total_bytes),
                    s.load[0],
                    s.load[1],
                    s.load[2],
                    s.guests_running,
                    s.guests_total,
                    human_secs(s.uptime_secs)
                ))
            }
            NodeCommand::SetHostname { node, hostname } => {
                let c = self.client(&node)?;
                self.connecting(&c);
                let (i, raw): (NodeInfo, _) = c
                    .send_json(
                        Method::PUT,
                        &Route::NodeHostname.path(),
                        Some(&Hostname { hostname }),
                    )
                    .await?;
                if self.json {
                    return out_raw(&raw);
                }
                out(&format!("host name of node {node} is now {}", i.hostname))
            }
            NodeCommand::Logs { node, lines } => {
                let c = self.client(&node)?;
                self.connecting(&c);
                let path = match lines {
                    Some(n) => Route::Logs.with_query(&[("lines", &n.to_string())]),
                    None => Route::Logs.path(),
                };
                let raw = c.call(Method::GET, &path, None, "").await?;
                out_raw(&raw)
            }
            NodeCommand::Power { node, action } => {
                let c = self.client(&node)?;
                self.connecting(&c);
                let body = match action {
                    PowerArg::Reboot => PowerAction::Reboot,
                    PowerArg::Poweroff => PowerAction::Poweroff,
                };
                let raw = c
                    .send_json_raw(Method::POST, &Route::Power.path(), Some(&body))
                    .await?;
                if self.json {
                    return out_raw(&raw);
                }
                let what = match action {
                    PowerArg::Reboot => "reboot",
                    PowerArg::Poweroff => "power off",
                };
                out(&format!("node {node}: {what} requested"))
            }
            NodeCommand::Metrics(a) => {
                let c = self.client(&a.node)?;
                self.connecting(&c);
                let raw = c
                    .call(Method::GET, &Route::Metrics.path(), None, "")
                    .await?;
                out_raw(&raw)
            }
        }
    }

    async fn guest_cmd(&self, cmd: GuestCommand) -> Result<(), CmdError> {
        match cmd {
            GuestCommand::List(a) => {
                let c = self.client(&a.node)?;
                self.connecting(&c);
                let (list, raw): (Vec<GuestStatus>, _) = c.get_json(&Route::Guests.path()).await?;
                if self.json {
                    return out_raw(&raw);
                }
                out(&format_guest_list(&list))
            }
            GuestCommand::Define(a) => {
                let spec = read_spec(&a.file)?;
                let c = self.client(&a.node)?;
                self.connecting(&c);
                let (g, raw): (GuestStatus, _) = c
                    .send_json(Method::POST, &Route::Guests.path(), Some(&spec))
                    .await?;
                self.guest_result(&g, &raw, "defined")
            }
            GuestCommand::Update(a) => {
                let spec = read_spec(&a.file)?;
                let c = self.client(&a.node)?;
                self.connecting(&c);
                let path = Route::Guest(spec.name.clone()).path();
                let (g, raw): (GuestStatus, _) =
                    c.send_json(Method::PUT, &path, Some(&spec)).await?;
                self.guest_result(&g, &raw, "updated")
            }
            GuestCommand::Show(a) => {
                guest::validate_name(&a.name)?;
                let c = self.client(&a.node)?;
                self.connecting(&c);
                let (g, raw): (GuestStatus, _) =
                    c.get_json(&Route::Guest(a.name.clone()).path()).await?;
                if self.json {
                    return out_raw(&raw);
                }
                out(&format_guest(&g))
            }
            GuestCommand::Start(a) => {
                self.guest_action(&a.node, &a.name, GuestAction::Start, None)
                    .await
            }
            GuestCommand::Stop(a) => {
                self.guest_action(&a.node, &a.name, GuestAction::Stop, None)
                    .await
            }
            GuestCommand::Shutdown(a) => {
                self.guest_action(&a.node, &a.name, GuestAction::Shutdown, a.timeout)
                    .await
            }
            GuestCommand::Pause(a) => {
                self.guest_action(&a.node, &a.name, GuestAction::Pause, None)
                    .await
            }
            GuestCommand::Resume(a) => {
                self.guest_action(&a.node, &a.name, GuestAction::Resume, None)
                    .await
            }
            GuestCommand::Reboot(a) => {
                self.guest_action(&a.node, &a.name, GuestAction::Reboot, a.timeout)
                    .await
            }
            GuestCommand::Delete(a) => {
                guest::validate_name(&a.name)?;
                let c = self.client(&a.node)?;
                self.connecting(&c);
                c.call(
                    Method::DELETE,
                    &Route::Guest(a.name.clone()).path(),
                    None,
                    "",
                )
                .await?;
                if self.json {
                    return out("{}");
                }
                out(&format!("deleted guest {}", a.name))
            }
            GuestCommand::Console {
                node,
                name,
                attach: true,
                ..
            } => {
                guest::validate_name(&name)?;
                let c = self.client(&node)?;
                self.connecting(&c);
                let conn = c
                    .upgrade(
                        &Route::GuestConsoleAttach(name.clone()).path(),
                        CONSOLE_PROTOCOL,
                    )
                    .await?;
                let banner = format!("Connected to {name}; Ctrl-] detaches");
                let end = attach::run(conn, &banner).await?;
                match end {
                    attach::End::Detached => eprintln!("\nDetached from {name}"),
                    attach::End::Closed => eprintln!(
                        "\nThe console of {name} closed: the guest stopped or node {node} ended the connection"
                    ),
                    attach::End::Signal => eprintln!("\nDetached from {name} (signal)"),
                }
                Ok(())
            }
            GuestCommand::Console {
                node, name, bytes, ..
            } => {
                guest::validate_name(&name)?;
                let c = self.client(&node)?;
                self.connecting(&c);
                let path = match bytes {
                    Some(n) => {
                        Route::GuestConsole(name.clone()).with_query(&[("bytes", &n.to_string())])
                    }
                    None => Route::GuestConsole(name.clone()).path(),
                };
                let raw = c.call(Method::GET, &path, None, "").await?;
                let mut stdout = std::io::stdout().lock();
                stdout
                    .write_all(&raw)
                    .and_then(|()| stdout.flush())
                    .map_err(CmdError::Output)
            }
        }
    }

    fn guest_result(&self, g: &GuestStatus, raw: &[u8], verb: &str) -> Result<(), CmdError> {
        if self.json {
            return out_raw(raw);
        }
        out(&format!(
            "{verb} guest {} ({})",
            g.spec.name,
            state_name(&g.state)
        ))
    }

    async fn guest_action(
        &self,
        node: &str,
        name: &str,
        action: GuestAction,
        timeout: Option<u64>,
    ) -> Result<(), CmdError> {
        guest::validate_name(name)?;
        let c = self.client(node)?;
        self.connecting(&c);
        let raw = c
            .call(
                Method::POST,
                &guest_action_path(name, action, timeout),
                None,
                "",
            )
            .await?;
        if self.json {
            return out_raw(&raw);
        }
        let g: GuestStatus = c.decode(&raw)?;
        out(&format!("guest {name}: {}", state_name(&g.state)))
    }

    async fn image_cmd(&self, cmd: ImageCommand) -> Result<(), CmdError> {
        match cmd {
            ImageCommand::List(a) => {
                let c = self.client(&a.node)?;
                self.connecting(&c);
                let (list, raw): (Vec<ImageFile>, _) = c.get_json(&Route::Images.path()).await?;
                if self.json {
                    return out_raw(&raw);
                }
                if list.is_empty() {
                    return out("no images");
                }
                let mut text = format!("{:<12} {}\n", "SIZE", "PATH");
                for f in &list {
                    text.push_str(&format!("{:<12} {}\n", human_bytes(f.size_bytes), f.path));
                }
                out(&text)
            }
            ImageCommand::Upload {
                node,
                local_file,
                remote_path,
            } => {
                guest::validate_image_path(&remote_path)?;
                let c = self.client(&node)?;
                self.upload(&c, &local_file, &remote_path).await
            }
            ImageCommand::Delete { node, path } => {
                guest::validate_image_path(&path)?;
                let c = self.client(&node)?;
                self.connecting(&c);
                c.call(Method::DELETE, &Route::Image(path.clone()).path(), None, "")
                    .await?;
                if self.json {
                    return out("{}");
                }
                out(&format!("deleted {path}"))
            }
        }
    }

    async fn upload(&self, c: &NodeClient, local: &Path, remote: &str) -> Result<(), CmdError> {
        let file = tokio::fs::File::open(local)
            .await
            .map_err(|e| CmdError::ReadFile(local.to_owned(), e))?;
        let size = file
            .metadata()
            .await
            .map_err(|e| CmdError::ReadFile(local.to_owned(), e))?
            .len();
        self.connecting(c);
        let progress = Progress::new(size);
        let stream =
            futures_util::stream::unfold((file, progress), |(mut file, mut progress)| async move {
                let mut buf = vec![0u8; 256 * 1024];
                match file.read(&mut buf).await {
                    Ok(0) => {
                        progress.finish();
                        None
                    }
                    Ok(n) => {
                        buf.truncate(n);
                        progress.add(n as u64);
                        Some((Ok(Frame::data(Bytes::from(buf))), (file, progress)))
                    }
                    Err(e) => Some((Err(e), (file, progress))),
                }
            });
        let body: ReqBody = BodyExt::boxed(StreamBody::new(stream));
        let mut req = c.request(Method::PUT, &Route::Image(remote.to_owned()).path(), body);
        let headers = req.headers_mut();
        headers.insert(hyper::header::CONTENT_LENGTH, size.into());
        headers.insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/octet-stream"),
        );
        let resp = c.send(req).await?;
        let raw = resp
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        if self.json {
            return out_raw(if raw.is_empty() { b"{}" } else { &raw });
        }
        out(&format!(
            "uploaded {} ({}) to {remote}",
            local.display(),
            human_bytes(size)
        ))
    }

    async fn events(
        &self,
        node: &str,
        since: Option<u64>,
        count: Option<u64>,
    ) -> Result<(), CmdError> {
        let c = self.client(node)?;
        self.connecting(&c);
        let path = match since {
            Some(s) => Route::Events.with_query(&[("since", &s.to_string())]),
            None => Route::Events.path(),
        };
        let empty: ReqBody =
            BodyExt::boxed(http_body_util::Empty::new().map_err(|never| match never {}));
        let mut req = c.request(Method::GET, &path, empty);
        req.headers_mut().insert(
            hyper::header::ACCEPT,
            hyper::header::HeaderValue::from_static("text/event-stream"),
        );
        let resp = c.send(req).await?;
        let mut body = resp.into_body().into_data_stream();
        let mut parser = sse::Parser::default();
        let mut seen = 0u64;
        if count == Some(0) {
            return Ok(());
        }
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| ClientError::Http {
                node: node.to_owned(),
                source: e,
            })?;
            for data in parser.push(&chunk) {
                if self.json {
                    out(&data)?;
                } else {
                    match serde_json::from_str::<Event>(&data) {
                        Ok(ev) => out(&format!(
                            "{:>6} {} {:<14} {:<12} {}",
                            ev.seq,
                            ev.timestamp,
                            ev.kind,
                            ev.guest.as_deref().unwrap_or("-"),
                            ev.message
                        ))?,
                        Err(_) => out(&data)?,
                    }
                }
                seen += 1;
                if count.is_some_and(|n| seen >= n) {
                    return Ok(());
                }
            }
        }
        Err(CmdError::StreamEnded)
    }

    async fn wait(
        &self,
        node: &str,
        guest: &str,
        wanted: WaitState,
        secs: u64,
    ) -> Result<(), CmdError> {
        guest::validate_name(guest)?;
        let c = self.client(node)?;
        self.connecting(&c);
        let want = match wanted {
            WaitState::Running => GuestState::Running,
            WaitState::Stopped => GuestState::Stopped,
            WaitState::Paused => GuestState::Paused,
        };
        let deadline = Instant::now() + Duration::from_secs(secs);
        let path = Route::Guest(guest.to_owned()).path();
        loop {
            let (g, raw): (GuestStatus, _) = c.get_json(&path).await?;
            if g.state == want {
                if self.json {
                    return out_raw(&raw);
                }
                return out(&format!("guest {guest}: {}", state_name(&g.state)));
            }
            if Instant::now() >= deadline {
                return Err(CmdError::WaitTimeout {
                    guest: guest.to_owned(),
                    wanted: state_name(&want),
                    secs,
                    last: state_name(&g.state),
                });
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

fn format_node_info(i: &NodeInfo) -> String {
    let mut s = format!(
        "hostname: {}\nversion: {}\nkernel: {}\ncpu: {} x {}\nmemory: {}\nkvm: {}\nuptime: {}\n",
        i.hostname,
        i.version,
        i.kernel,
        i.cpus,
        i.cpu_model,
        human_bytes(i.memory_bytes),
        if i.kvm { "yes" } else { "no" },
        human_secs(i.uptime_secs)
    );
    for n in &i.nics {
        s.push_str(&format!(
            "nic {}: {} carrier={} {} ({})\n",
            n.name,
            n.mac,
            if n.carrier { "up" } else { "down" },
            if n.addresses.is_empty() {
                "-".to_owned()
            } else {
                n.addresses.join(" ")
            },
            state_name(&n.source)
        ));
    }
    for d in &i.disks {
        s.push_str(&format!(
            "disk {}: {} {}{}\n",
            d.name,
            human_bytes(d.size_bytes),
            d.model,
            if d.blank { " (blank)" } else { "" }
        ));
    }
    s
}

fn format_guest_list(list: &[GuestStatus]) -> String {
    if list.is_empty() {
        return "no guests".into();
    }
    let mut s = format!(
        "{:<20} {:<14} {:>5} {:>10} {:>8}\n",
        "NAME", "STATE", "VCPUS", "MEMORY", "UPTIME"
    );
    for g in list {
        s.push_str(&format!(
            "{:<20} {:<14} {:>5} {:>10} {:>8}\n",
            g.spec.name,
            state_name(&g.state),
            g.spec.vcpus,
            format!("{} MiB", g.spec.memory_mib),
            g.uptime_secs.map(human_secs).unwrap_or_else(|| "-".into())
        ));
    }
    s
}

fn format_guest(g: &GuestStatus) -> String {
    let spec = toml::to_string(&g.spec).unwrap_or_default();
    let mut s = format!("state: {}\n", state_name(&g.state));
    if let Some(pid) = g.pid {
        s.push_str(&format!("pid: {pid}\n"));
    }
    if let Some(u) = g.uptime_secs {
        s.push_str(&format!("uptime: {}\n", human_secs(u)));
    }
    if let Some(why) = &g.crash_reason {
        s.push_str(&format!("crashed: {why}\n"));
    }
    s.push('\n');
    s.push_str(&spec);
    s
}

/// Upload progress on stderr: a rewritten line on a terminal, a line per 10% otherwise.
struct Progress {
    total: u64,
    done: u64,
    started: Instant,
    last: Instant,
    last_tenth: u64,
    tty: bool,
}

impl Progress {
    fn new(total: u64) -> Self {
        let now = Instant::now();
        Self {
            total,
            done: 0,
            started: now,
            last: now,
            last_tenth: 0,
            tty: std::io::stderr().is_terminal(),
        }
    }

    fn line(&self) -> String {
        let pct = (self.done * 100).checked_div(self.total).unwrap_or(100);
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        format!(
            "uploaded {} of {} ({pct}%, {}/s)",
            human_bytes(self.done),
            human_bytes(self.total),
            human_bytes((self.done as f64 / secs) as u64)
        )
    }

    fn add(&mut self, n: u64) {
        self.done += n;
        if self.tty {
            if self.last.elapsed() >= Duration::from_millis(250) {
                self.last = Instant::now();
                eprint!("\r{}   ", self.line());
            }
        } else {
            let tenth = (self.done * 10).checked_div(self.total).unwrap_or(10);
            if tenth > self.last_tenth {
                self.last_tenth = tenth;
                eprintln!("{}", self.line());
            }
        }
    }

    fn finish(&mut self) {
        if self.tty {
            eprintln!("\r{}   ", self.line());
        } else if self.last_tenth < 10 {
            eprintln!("{}", self.line());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_invalid_guest_definition_before_sending() {
        let dir = std::env::temp_dir().join(format!("hvnodectl-spec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bad = dir.join("bad.toml");
        std::fs::write(&bad, "name = \"web\"\nkernel = \"../vmlinuz\"\n").unwrap();
        assert!(matches!(
            read_spec(&bad),
            Err(CmdError::Spec(GuestSpecError::Path(_)))
        ));
        let good = dir.join("good.toml");
        std::fs::write(
            &good,
            "name = \"web\"\nkernel = \"vmlinuz\"\nmemory_mib = 128\n",
        )
        .unwrap();
        assert_eq!(read_spec(&good).unwrap().memory_mib, 128);
        let typo = dir.join("typo.toml");
        std::fs::write(
            &typo,
            "name = \"web\"\nkernel = \"vmlinuz\"\nmemory = 128\n",
        )
        .unwrap();
        assert!(matches!(read_spec(&typo), Err(CmdError::ParseSpec(..))));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
