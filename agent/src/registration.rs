//! Registration with a manager, both ways: manager-initiated with the pairing code shown on the
//! console, and node-initiated (fetch the manager's CA, the admin checks its fingerprint, send a
//! join request, poll for the decision; the client half is in [`crate::manager`]). Owns the
//! persisted registration, the pairing code, the candidate manager and the TLS server
//! configuration that trusts the registered manager's CA.

use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use hvnode_api::error::ErrorCode;
use hvnode_api::registration::{
    AcceptManager, JoinState, ManagerCandidate, ManagerUrl, NodeJoinRequest, NodeJoinStatus,
    PairRequest, RegistrationState, RegistrationStatus,
};
use hvnode_api::routes::ManagerRoute;
use hyper::{Method, StatusCode};
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::http::{json_response, no_content, Resp};
use crate::{manager, node, tls, Agent, Origin};

/// Wrong pairing codes tolerated before the code is replaced.
pub const PAIRING_ATTEMPTS: u32 = 5;
const CODE_ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZ23456789";
/// How often a pending node-initiated registration asks the manager for its decision.
const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// The persisted registration (`registration.toml`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Saved {
    state: RegistrationState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    manager_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ca_pem: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    manager_url: Option<String>,
    #[serde(default)]
    registered_at: u64,
}

impl Default for Saved {
    fn default() -> Self {
        Saved {
            state: RegistrationState::Unregistered,
            manager_name: None,
            ca_pem: None,
            manager_url: None,
            registered_at: 0,
        }
    }
}

#[derive(Debug)]
struct Pairing {
    /// `None` while the system gave no randomness to make one: then nothing pairs.
    code: Option<String>,
    failures: u32,
}

/// The registration domain's state.
#[derive(Debug)]
pub struct Registration {
    saved: Mutex<Saved>,
    /// Bumped whenever the trusted manager CA changes; connections verified under an older
    /// generation no longer count as authenticated.
    generation: Mutex<u64>,
    pairing: Mutex<Pairing>,
    tls: RwLock<Arc<rustls::ServerConfig>>,
    /// Node-initiated registration: the manager fetched for the admin to accept, with its CA.
    candidate: Mutex<Option<(ManagerCandidate, String)>>,
}

impl Registration {
    /// Loads the saved registration from `file` and builds the TLS configuration it implies.
    pub fn load(
        file: &std::path::Path,
        identity: &tls::Identity,
    ) -> Result<Registration, tls::TlsError> {
        let saved: Saved = std::fs::read_to_string(file)
            .ok()
            .and_then(|t| toml::from_str(&t).ok())
            .unwrap_or_default();
        let config = tls::server_config(identity, saved.ca_pem.as_deref())?;
        Ok(Registration {
            saved: Mutex::new(saved),
            generation: Mutex::new(1),
            pairing: Mutex::new(Pairing {
                code: random_code(),
                failures: 0,
            }),
            tls: RwLock::new(Arc::new(config)),
            candidate: Mutex::new(None),
        })
    }

    /// The TLS configuration new connections use, with the registration generation it reflects.
    pub fn tls_config(&self) -> (Arc<rustls::ServerConfig>, u64) {
        let gen = *self.generation.lock().unwrap_or_else(|e| e.into_inner());
        let cfg = self.tls.read().unwrap_or_else(|e| e.into_inner()).clone();
        (cfg, gen)
    }

    /// Whether a manager is registered.
    pub fn is_registered(&self) -> bool {
        self.saved.lock().unwrap_or_else(|e| e.into_inner()).state == RegistrationState::Registered
    }

    /// The registered manager's CA (PEM), if registered.
    pub fn ca_pem(&self) -> Option<String> {
        let saved = self.saved.lock().unwrap_or_else(|e| e.into_inner());
        (saved.state == RegistrationState::Registered)
            .then(|| saved.ca_pem.clone())
            .flatten()
    }

    /// The current registration generation.
    pub fn generation(&self) -> u64 {
        *self.generation.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn new_pairing_code(&self) {
        let mut p = self.pairing.lock().unwrap_or_else(|e| e.into_inner());
        p.code = random_code();
        p.failures = 0;
    }

    /// Checks a pairing code; too many wrong ones replace the code.
    fn check_code(&self, code: &str) -> Result<(), Error> {
        let mut p = self.pairing.lock().unwrap_or_else(|e| e.into_inner());
        let Some(expected) = p.code.clone() else {
            p.code = random_code();
            return Err(Error::new(
                ErrorCode::PairingLocked,
                "The node has no pairing code (no randomness to make one): ask for a new code on its console",
            ));
        };
        if constant_time_eq(code.trim().as_bytes(), expected.as_bytes()) {
            return Ok(());
        }
        p.failures += 1;
        if p.failures >= PAIRING_ATTEMPTS {
            p.code = random_code();
            p.failures = 0;
            eprintln!("agent: {PAIRING_ATTEMPTS} wrong pairing codes; made a new one");
            return Err(Error::new(
                ErrorCode::PairingLocked,
                "Too many wrong pairing codes: read the new code on the node's console",
            ));
        }
        Err(Error::new(
            ErrorCode::WrongPairingCode,
            "Wrong pairing code: read the code on the node's console (Manager screen)",
        ))
    }
}

impl Agent {
    /// `GET /v1/registration` (and the answer of every registration change).
    pub(crate) fn registration_status(&self, origin: Origin) -> RegistrationStatus {
        let r = &self.registration;
        let saved = r.saved.lock().unwrap_or_else(|e| e.into_inner());
        RegistrationStatus {
            state: saved.state,
            manager_name: saved.manager_name.clone(),
            node_fingerprint: self.fingerprint.clone(),
            pairing_code: (origin == Origin::Local)
                .then(|| {
                    r.pairing
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .code
                        .clone()
                })
                .flatten(),
        }
    }

    fn registration_answer(&self, origin: Origin) -> Resp {
        json_response(StatusCode::OK, &self.registration_status(origin))
    }

    /// Saves a new registration, trusts its CA from the next connection on, and replaces the
    /// pairing code.
    fn set_registration(&self, saved: Saved) -> Result<(), Error> {
        let r = &self.registration;
        let text = toml::to_string(&saved).map_err(|e| Error::internal("Registration", e))?;
        hvnode_base::fs::write_atomic(&self.paths.registration(), text.as_bytes(), 0o600)
            .map_err(|e| Error::internal("Saving the registration", e))?;
        let config = tls::server_config(&self.identity, saved.ca_pem.as_deref())
            .map_err(|e| Error::internal("TLS configuration", e))?;
        *r.tls.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
        *r.generation.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        *r.saved.lock().unwrap_or_else(|e| e.into_inner()) = saved;
        r.new_pairing_code();
        Ok(())
    }

    /// `POST /v1/registration`: manager-initiated registration with the pairing code.
    pub(crate) fn pair(&self, req: PairRequest, origin: Origin) -> Result<Resp, Error> {
        if self.registration.is_registered() && origin != Origin::Local {
            return Err(Error::new(
                ErrorCode::AlreadyRegistered,
                "The node is registered with another manager: unregister it at its console first",
            ));
        }
        self.registration.check_code(&req.code)?;
        if req.manager_name.trim().is_empty() || req.manager_name.len() > 255 {
            return Err(Error::new(
                ErrorCode::InvalidManagerName,
                "manager_name must be 1-255 characters",
            ));
        }
        tls::validate_ca(&req.ca_pem).map_err(|e| {
            Error::new(
                ErrorCode::InvalidCa,
                format!("ca_pem is not a usable CA certificate: {e}"),
            )
        })?;
        self.set_registration(Saved {
            state: RegistrationState::Registered,
            manager_name: Some(req.manager_name.clone()),
            ca_pem: Some(req.ca_pem),
            manager_url: None,
            registered_at: crate::unix_secs(),
        })?;
        eprintln!("agent: registered with manager {}", req.manager_name);
        self.events.emit(
            "registration",
            None,
            format!("registered with manager {}", req.manager_name),
        );
        Ok(self.registration_answer(origin))
    }

    /// `DELETE /v1/registration`.
    pub(crate) fn unregister(&self, origin: Origin) -> Result<Resp, Error> {
        self.set_registration(Saved::default())?;
        eprintln!("agent: unregistered");
        self.events.emit("registration", None, "unregistered");
        Ok(self.registration_answer(origin))
    }

    /// `POST /v1/registration/pairing-code`.
    pub(crate) fn new_pairing_code(&self, origin: Origin) -> Resp {
        self.registration.new_pairing_code();
        self.registration_answer(origin)
    }

    /// `POST /v1/registration/manager`: fetches a manager's name and CA for the admin to check.
    pub(crate) async fn fetch_candidate(&self, m: ManagerUrl) -> Result<Resp, Error> {
        let bad = |e: manager::ManagerError| match e {
            manager::ManagerError::Url(_) => {
                Error::new(ErrorCode::InvalidManagerUrl, e.to_string())
            }
            e => Error::new(ErrorCode::ManagerUnreachable, e.to_string()),
        };
        let base = manager::BaseUrl::parse(&m.url).map_err(bad)?;
        let hello = manager::fetch_hello(&base).await.map_err(bad)?;
        let ca_fingerprint = tls::validate_ca(&hello.ca_pem).map_err(|e| {
            Error::new(
                ErrorCode::InvalidManagerCa,
                format!("The manager's CA is unusable: {e}"),
            )
        })?;
        let candidate = ManagerCandidate {
            url: m.url.trim_end_matches('/').to_owned(),
            manager_name: hello.name,
            ca_fingerprint,
        };
        *self
            .registration
            .candidate
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some((candidate.clone(), hello.ca_pem));
        Ok(json_response(StatusCode::OK, &candidate))
    }

    /// `POST /v1/registration/manager/reject`.
    pub(crate) fn reject_candidate(&self) -> Resp {
        *self
            .registration
            .candidate
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = None;
        no_content()
    }

    /// `POST /v1/registration/manager/accept`: sends the join request to the fetched manager;
    /// the registration is pending until the manager decides.
    pub(crate) async fn accept_candidate(
        self: &Arc<Self>,
        a: AcceptManager,
        origin: Origin,
    ) -> Result<Resp, Error> {
        let fingerprint = a.ca_fingerprint;
        let (candidate, ca_pem) = self
            .registration
            .candidate
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| {
                Error::new(
                    ErrorCode::NoCandidate,
                    "Fetch the manager first (POST /v1/registration/manager)",
                )
            })?;
        if !fingerprint.eq_ignore_ascii_case(&candidate.ca_fingerprint) {
            return Err(Error::new(
                ErrorCode::FingerprintMismatch,
                format!(
                    "The manager's CA fingerprint is {}, not {fingerprint}",
                    candidate.ca_fingerprint
                ),
            ));
        }
        let base = manager::BaseUrl::parse(&candidate.url)
            .map_err(|e| Error::new(ErrorCode::InvalidManagerUrl, e.to_string()))?;
        let config = manager::trusted_config(&ca_pem, &self.identity)
            .map_err(|e| Error::internal("Manager TLS", e))?;
        let join = NodeJoinRequest {
            hostname: node::facts::hostname(),
            node_cert_pem: self.identity.cert_pem.clone(),
            api_port: 8443,
        };
        let body = serde_json::to_vec(&join).map_err(|e| Error::internal("Join request", e))?;
        let (status, answer) = manager::request(
            &base,
            config,
            Method::POST,
            &ManagerRoute::Nodes.path(),
            Some(body),
        )
        .await
        .map_err(|e| Error::new(ErrorCode::ManagerUnreachable, e.to_string()))?;
        if !(200..300).contains(&status) {
            return Err(Error::new(
                ErrorCode::ManagerRefused,
                format!(
                    "The manager refused the join request ({status}): {}",
                    String::from_utf8_lossy(&answer)
                ),
            ));
        }
        {
            let mut saved = self
                .registration
                .saved
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            saved.state = RegistrationState::Pending;
            saved.manager_name = Some(candidate.manager_name.clone());
            saved.manager_url = Some(candidate.url.clone());
            saved.ca_pem = Some(ca_pem);
            let text = toml::to_string(&*saved).map_err(|e| Error::internal("Registration", e))?;
            hvnode_base::fs::write_atomic(&self.paths.registration(), text.as_bytes(), 0o600)
                .map_err(|e| Error::internal("Saving the registration", e))?;
        }
        *self
            .registration
            .candidate
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = None;
        eprintln!(
            "agent: join request sent to {}; waiting for approval",
            candidate.url
        );
        self.resume_pending();
        Ok(self.registration_answer(origin))
    }

    /// While the registration is pending, polls the manager for its decision. Called after a
    /// join request and at start-up.
    pub fn resume_pending(self: &Arc<Self>) {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                let saved = me
                    .registration
                    .saved
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                let (Some(url), Some(ca)) = (saved.manager_url.clone(), saved.ca_pem.clone())
                else {
                    return;
                };
                if saved.state != RegistrationState::Pending {
                    return;
                }
                let decision = match (
                    manager::BaseUrl::parse(&url),
                    manager::trusted_config(&ca, &me.identity),
                ) {
                    (Ok(base), Ok(cfg)) => {
                        let path = ManagerRoute::Node(me.fingerprint.clone()).path();
                        manager::request(&base, cfg, Method::GET, &path, None)
                            .await
                            .ok()
                            .filter(|(s, _)| *s == 200)
                            .and_then(|(_, b)| serde_json::from_slice::<NodeJoinStatus>(&b).ok())
                    }
                    _ => return,
                };
                match decision.map(|d| d.state) {
                    Some(JoinState::Approved) => {
                        let mut done = saved;
                        done.state = RegistrationState::Registered;
                        done.registered_at = crate::unix_secs();
                        if me.set_registration(done).is_ok() {
                            eprintln!("agent: the manager approved the join request: registered");
                            me.events.emit(
                                "registration",
                                None,
                                "the manager approved the join request",
                            );
                        }
                        return;
                    }
                    Some(JoinState::Rejected) => {
                        let _ = me.set_registration(Saved::default());
                        eprintln!("agent: the manager rejected the join request");
                        me.events.emit(
                            "registration",
                            None,
                            "the manager rejected the join request",
                        );
                        return;
                    }
                    _ => tokio::time::sleep(POLL_INTERVAL).await,
                }
            }
        });
    }
}

/// A new pairing code from the operating system's random source. Without randomness there is
/// no code: one guessable from the clock would be worse than none.
fn random_code() -> Option<String> {
    let mut bytes = [0u8; 8];
    if let Err(e) = getrandom::fill(&mut bytes) {
        eprintln!("agent: no randomness for a pairing code ({e}): pairing is off until there is");
        return None;
    }
    Some(
        bytes
            .iter()
            .map(|b| CODE_ALPHABET[(*b as usize) % CODE_ALPHABET.len()] as char)
            .collect(),
    )
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}
