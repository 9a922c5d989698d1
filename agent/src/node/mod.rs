//! The node itself: what it is (`GET /v1/node`, cached), its host name, its load (`/v1/stats`,
//! `/metrics`), its log and its power. Owns the info cache and the CPU counters the load is
//! measured against.

pub mod facts;
pub mod metrics;

use std::sync::{Arc, Mutex};

use hvnode_api::error::ErrorCode;
use hvnode_api::init::InitRequest;
use hvnode_api::node::{Hostname, NodeStats, PowerAction};
use hyper::StatusCode;

use crate::error::{blocking, Error};
use crate::http::{json_response, text_response, typed, Resp};
use crate::Agent;

/// Lines of the node log `GET /v1/logs` returns without `?lines=`, and at most.
const LOG_LINES_DEFAULT: usize = 200;
const LOG_LINES_MAX: usize = 10_000;

/// The node domain's state.
#[derive(Debug)]
pub struct Node {
    info: facts::InfoCache,
    /// `(busy, total)` jiffies at the last stats request: the CPU load is measured since then.
    cpu: Mutex<(u64, u64)>,
}

impl Node {
    /// Reads the fixed facts of the node.
    pub fn new(run_dir: &std::path::Path) -> Node {
        Node {
            info: facts::InfoCache::new(run_dir),
            cpu: Mutex::new(facts::cpu_times()),
        }
    }
}

impl Agent {
    /// `GET /v1/node`.
    pub(crate) fn node_info(&self) -> Resp {
        typed(StatusCode::OK, self.node.info.json(), "application/json")
    }

    /// `PUT /v1/node/hostname`: saved in node.toml, applied through init.
    pub(crate) async fn set_hostname(self: &Arc<Self>, h: Hostname) -> Result<Resp, Error> {
        let me = Arc::clone(self);
        let info = blocking("Host name", move || {
            hvnode_api::config::validate_hostname(&h.hostname)
                .map_err(|e| Error::new(ErrorCode::InvalidHostname, e.to_string()))?;
            me.config
                .update(|c| c.hostname = Some(h.hostname.clone()))?;
            me.init.request(&InitRequest::SetHostname {
                hostname: h.hostname.clone(),
            })?;
            eprintln!("agent: host name set to {}", h.hostname);
            me.events
                .emit("network", None, format!("host name set to {}", h.hostname));
            Ok(me.node.info.refresh())
        })
        .await?;
        Ok(json_response(StatusCode::OK, &info))
    }

    /// The node's load since the last call.
    pub(crate) fn stats(&self) -> NodeStats {
        self.stats_counting(self.guest_count())
    }

    /// [`Agent::stats`] for a caller that has read the guest definitions already.
    pub(crate) fn stats_counting(&self, guests_total: u32) -> NodeStats {
        let (busy, total) = facts::cpu_times();
        let mut last = self.node.cpu.lock().unwrap_or_else(|e| e.into_inner());
        let (db, dt) = (busy.saturating_sub(last.0), total.saturating_sub(last.1));
        *last = (busy, total);
        let (mem_total, mem_avail) = facts::memory();
        NodeStats {
            cpu_percent: if dt == 0 {
                0.0
            } else {
                db as f64 * 100.0 / dt as f64
            },
            memory_used_bytes: mem_total.saturating_sub(mem_avail),
            memory_total_bytes: mem_total,
            load: facts::load(),
            guests_total,
            guests_running: self.running.running_count() as u32,
            uptime_secs: facts::uptime_secs(),
        }
    }

    /// `GET /v1/logs?lines=N`: the tail of the node log.
    pub(crate) fn logs(&self, lines: Option<String>) -> Result<Resp, Error> {
        let lines = crate::http::query_number("lines", lines, LOG_LINES_MAX as u64)?
            .map_or(LOG_LINES_DEFAULT, |n| n as usize);
        let text = std::fs::read_to_string(&self.paths.node_log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let tail = all[all.len().saturating_sub(lines)..].join("\n");
        Ok(text_response(
            StatusCode::OK,
            tail + "\n",
            "text/plain; charset=utf-8",
        ))
    }

    /// `POST /v1/power`: through init, which stops guests and services first.
    pub(crate) async fn power(self: &Arc<Self>, action: PowerAction) -> Result<Resp, Error> {
        let request = match action {
            PowerAction::Reboot => InitRequest::Reboot,
            PowerAction::Poweroff => InitRequest::PowerOff,
        };
        eprintln!("agent: power request {action:?}");
        self.events
            .emit("power", None, format!("{action:?}").to_lowercase());
        let me = Arc::clone(self);
        blocking("Power", move || me.init.request(&request)).await?;
        Ok(json_response(
            StatusCode::ACCEPTED,
            &serde_json::json!({"accepted": true}),
        ))
    }
}
