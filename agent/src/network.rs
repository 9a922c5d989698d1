//! The node's network configuration: a change is applied through init at once and rolls back by
//! itself unless it is confirmed within [`NETWORK_ROLLBACK`], so that a change that cuts the node
//! off undoes itself. Owns the pending change (also kept on tmpfs, so that a restarted agent
//! still rolls it back) and its timer's token.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hvnode_api::config::NetworkConfig;
use hvnode_api::error::ErrorCode;
use hvnode_api::init::InitRequest;
use hvnode_api::node::NetworkView;
use hyper::StatusCode;
use serde::{Deserialize, Serialize};

use crate::error::{blocking, Error};
use crate::http::{json_response, Resp};
use crate::{node, Agent};

/// How long an applied network change waits for confirmation before it rolls back.
pub const NETWORK_ROLLBACK: Duration = Duration::from_secs(60);

/// An applied, unconfirmed network change.
#[derive(Debug, Serialize, Deserialize)]
struct PendingNetwork {
    token: u64,
    new: NetworkConfig,
    previous: NetworkConfig,
    /// CLOCK_BOOTTIME in milliseconds: it survives agent restarts and ignores clock changes.
    deadline_ms: u64,
}

/// The network domain's state.
#[derive(Debug, Default)]
pub struct Network {
    /// An applied network change waiting for confirmation.
    pending: Mutex<Option<PendingNetwork>>,
    /// The last change token handed out (see [`Agent::next_network_token`]).
    token: AtomicU64,
}

/// CLOCK_BOOTTIME in milliseconds.
fn boottime_ms() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| {
            u64::try_from(t.tv_sec()).unwrap_or(0) * 1000
                + u64::try_from(t.tv_nsec()).unwrap_or(0) / 1_000_000
        })
        .unwrap_or(0)
}

impl Agent {
    /// `GET /v1/network` (and the answer of every change).
    pub(crate) fn network_view(&self) -> Result<NetworkView, Error> {
        let (rollback_in_secs, pending) = self
            .network
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|p| {
                let left = p.deadline_ms.saturating_sub(boottime_ms()) / 1000;
                (Some(left), Some(p.new.clone()))
            })
            .unwrap_or_default();
        Ok(NetworkView {
            config: self.config.read()?.network,
            status: node::facts::network_status(&self.paths.run),
            rollback_in_secs,
            pending,
        })
    }

    fn network_answer(&self) -> Result<Resp, Error> {
        Ok(json_response(StatusCode::OK, &self.network_view()?))
    }

    /// `PUT /v1/network`: applies the change now; it rolls back unless confirmed.
    pub(crate) async fn apply_network(
        self: &Arc<Self>,
        network: NetworkConfig,
    ) -> Result<Resp, Error> {
        network
            .validate()
            .map_err(|e| Error::new(ErrorCode::InvalidNetwork, e.to_string()))?;
        let saved = self.config.read()?.network;
        let me = Arc::clone(self);
        let apply = network.clone();
        blocking("Network", move || {
            me.init
                .request(&InitRequest::ApplyNetwork { network: apply })
        })
        .await?;
        let token = {
            let mut p = self
                .network
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let token = self.next_network_token();
            let pending = PendingNetwork {
                token,
                new: network,
                previous: saved,
                deadline_ms: boottime_ms() + NETWORK_ROLLBACK.as_millis() as u64,
            };
            self.save_pending_network(Some(&pending));
            *p = Some(pending);
            token
        };
        eprintln!(
            "agent: network change applied; rolls back in {} s unless confirmed",
            NETWORK_ROLLBACK.as_secs()
        );
        self.arm_network_rollback(token, NETWORK_ROLLBACK);
        self.network_answer()
    }

    /// `POST /v1/network/confirm`: saves the pending change in node.toml.
    pub(crate) fn confirm_network(&self) -> Result<Resp, Error> {
        let pending = self
            .network
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| {
                Error::new(
                    ErrorCode::NoPendingChange,
                    "There is no network change to confirm",
                )
            })?;
        self.config.update(|c| c.network = pending.new)?;
        self.save_pending_network(None);
        eprintln!("agent: network change confirmed and saved");
        self.events
            .emit("network", None, "network change confirmed and saved");
        self.network_answer()
    }

    /// `POST /v1/network/rollback`: re-applies the saved configuration now.
    pub(crate) async fn rollback_network_now(self: &Arc<Self>) -> Result<Resp, Error> {
        let me = Arc::clone(self);
        let rolled = blocking("Network", move || me.rollback_network(None)).await?;
        if !rolled {
            return Err(Error::new(
                ErrorCode::NoPendingChange,
                "There is no network change to roll back",
            ));
        }
        self.network_answer()
    }

    /// A token no earlier change of this boot used, so that an old timer never rolls back a
    /// newer change (tokens survive agent restarts through the pending file).
    fn next_network_token(&self) -> u64 {
        let now = boottime_ms();
        let last = self.network.token.fetch_max(now, Ordering::SeqCst);
        if last >= now {
            self.network.token.fetch_add(1, Ordering::SeqCst) + 1
        } else {
            now
        }
    }

    /// Writes (or with `None` removes) the pending change's file. A failure is logged: the
    /// in-memory timer still rolls back, only a restart of the agent would lose it.
    fn save_pending_network(&self, pending: Option<&PendingNetwork>) {
        let path = self.paths.pending_network();
        let result = match pending {
            Some(p) => serde_json::to_vec(p)
                .map_err(std::io::Error::other)
                .and_then(|b| hvnode_base::fs::write_atomic(&path, &b, 0o600)),
            None => match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
        };
        if let Err(e) = result {
            eprintln!("agent: {}: {e}", path.display());
        }
    }

    fn arm_network_rollback(self: &Arc<Self>, token: u64, after: Duration) {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let result =
                tokio::task::spawn_blocking(move || me.rollback_network(Some(token))).await;
            if let Ok(Err(e)) = result {
                eprintln!("agent: network rollback failed: {}", e.message);
            }
        });
    }

    /// Takes over a network change that an earlier agent applied and that is still
    /// unconfirmed: its rollback happens at the original deadline, or at once if that passed.
    pub fn resume_network_rollback(self: &Arc<Self>) {
        let Ok(bytes) = std::fs::read(self.paths.pending_network()) else {
            return;
        };
        let pending = match serde_json::from_slice::<PendingNetwork>(&bytes) {
            Ok(p) => p,
            Err(e) => {
                eprintln!(
                    "agent: {} is unreadable ({e}); the network stays as it is",
                    self.paths.pending_network().display()
                );
                self.save_pending_network(None);
                return;
            }
        };
        let left = Duration::from_millis(pending.deadline_ms.saturating_sub(boottime_ms()));
        eprintln!(
            "agent: an unconfirmed network change is pending; it rolls back in {} s",
            left.as_secs()
        );
        let token = pending.token;
        self.network.token.fetch_max(token, Ordering::SeqCst);
        *self
            .network
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(pending);
        self.arm_network_rollback(token, left);
    }

    /// Re-applies the saved network configuration if a change is pending (and, when `token` is
    /// given, only if it is still that change). Returns whether it rolled back.
    fn rollback_network(&self, token: Option<u64>) -> Result<bool, Error> {
        let pending = {
            let mut p = self
                .network
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            match (p.as_ref(), token) {
                (Some(x), Some(t)) if x.token != t => return Ok(false),
                (None, _) => return Ok(false),
                _ => p.take(),
            }
        };
        let Some(pending) = pending else {
            return Ok(false);
        };
        self.save_pending_network(None);
        eprintln!("agent: rolling the network back to the saved configuration");
        self.events
            .emit("network", None, "network change rolled back");
        self.init.request(&InitRequest::ApplyNetwork {
            network: pending.previous,
        })?;
        Ok(true)
    }
}
