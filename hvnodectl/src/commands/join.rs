//! Node-initiated registration, the admin's side: `requests` lists what nodes sent to
//! `hvnodectl serve`, `approve` and `reject` decide (the node learns it when it next polls).

use hvnode_api::fingerprint;
use hvnode_api::registration::JoinState;

use super::{CmdError, Ctx};
use crate::client;
use crate::output;
use crate::state::{self, JoinRecord, NodeEntry};

impl Ctx {
    /// The join request `key` names: a fingerprint, or the host name of one node.
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
            let mut pending = matches.iter().filter(|r| r.state == JoinState::Pending);
            return match (pending.next(), pending.next()) {
                (Some(only), None) => Ok(only.clone()),
                _ => Err(CmdError::AmbiguousRequest(key.to_owned())),
            };
        }
        matches
            .pop()
            .ok_or_else(|| CmdError::RequestNotFound(key.to_owned()))
    }

    pub(super) fn requests(&self) -> Result<(), CmdError> {
        let list = self.state.join_requests()?;
        self.show(&list, || output::join_requests(&list))
    }

    pub(super) fn approve(&self, key: &str, name: &str, url: Option<&str>) -> Result<(), CmdError> {
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
        self.show(&record, || {
            format!(
                "approved {} as node {name} at {}; it registers when it next polls the manager",
                record.hostname, entry.url
            )
        })
    }

    pub(super) fn reject(&self, key: &str) -> Result<(), CmdError> {
        let mut record = self.find_request(key)?;
        if record.state != JoinState::Pending {
            return Err(CmdError::AlreadyDecided {
                hostname: record.hostname,
                state: output::state_name(&record.state),
            });
        }
        record.state = JoinState::Rejected;
        self.state.save_join_request(&record)?;
        self.show(&record, || {
            format!("rejected the join request from {}", record.hostname)
        })
    }
}
