//! How hvnodectl's answers look: the choice between the agent's raw JSON (`--json`) and text
//! for humans, the tables and summaries of that text, and the upload progress on stderr. The
//! command modules decide what to print; this module decides how it looks.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use hvnode_api::event::Event;
use hvnode_api::guest::{GuestState, GuestStatus, SnapshotStatus};
use hvnode_api::migration::MigrationView;
use hvnode_api::node::{NodeInfo, NodeStats};
use hvnode_api::units::{bytes, secs};
use hvnode_api::vmm::{MigrationPhase, MigrationStatus};
use serde::Serialize;

use crate::state::JoinRecord;
use hvnode_api::node::ImageFile;

/// Stdout could not be written (a closed pipe, a full disk).
#[derive(Debug, thiserror::Error)]
#[error("Cannot write the output")]
pub struct OutputError(#[source] std::io::Error);

/// Prints `text`, ending it with a newline if it has none.
pub fn text(text: &str) -> Result<(), OutputError> {
    raw(text.as_bytes())
}

/// Prints bytes as they came from the node, ending them with a newline if they have none.
pub fn raw(bytes: &[u8]) -> Result<(), OutputError> {
    let newline = !bytes.is_empty() && !bytes.ends_with(b"\n");
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(bytes)
        .and_then(|()| match newline {
            true => stdout.write_all(b"\n"),
            false => Ok(()),
        })
        .and_then(|()| stdout.flush())
        .map_err(OutputError)
}

/// Prints bytes exactly as they are: a guest's console log is the guest's, newline or not.
pub fn verbatim(bytes: &[u8]) -> Result<(), OutputError> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(bytes)
        .and_then(|()| stdout.flush())
        .map_err(OutputError)
}

/// The agent's answer `json` as it came with `--json`, else the text `human` makes of it.
pub fn answer(
    as_json: bool,
    json: &[u8],
    human: impl FnOnce() -> String,
) -> Result<(), OutputError> {
    if as_json {
        raw(json)
    } else {
        text(&human())
    }
}

/// A value of hvnodectl's own (state files, join requests) as one line of JSON.
pub fn json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

/// The wire name of a state enum (`running`, `approved`, `dhcp`): what the docs and `--json`
/// call it.
pub fn state_name<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

/// `node info`.
pub fn node_info(i: &NodeInfo) -> String {
    let mut s = format!(
        "hostname: {}\nversion: {}\nkernel: {}\ncpu: {} x {}\nmemory: {}\nkvm: {}\nuptime: {}\n",
        i.hostname,
        i.version,
        i.kernel,
        i.cpus,
        i.cpu_model,
        bytes(i.memory_bytes),
        if i.kvm { "yes" } else { "no" },
        secs(i.uptime_secs)
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
            bytes(d.size_bytes),
            d.model,
            if d.blank { " (blank)" } else { "" }
        ));
    }
    s
}

/// `node stats`.
pub fn node_stats(s: &NodeStats) -> String {
    format!(
        "cpu: {:.1}%\nmemory: {} of {}\nload: {:.2} {:.2} {:.2}\nguests: {} running of {}\nuptime: {}",
        s.cpu_percent,
        bytes(s.memory_used_bytes),
        bytes(s.memory_total_bytes),
        s.load[0],
        s.load[1],
        s.load[2],
        s.guests_running,
        s.guests_total,
        secs(s.uptime_secs)
    )
}

/// `guest list`.
pub fn guest_list(list: &[GuestStatus]) -> String {
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
            g.uptime_secs.map(secs).unwrap_or_else(|| "-".into())
        ));
    }
    s
}

/// A guest's state after an action or a wait: `guest web: running`.
pub fn guest_state(name: &str, state: &GuestState) -> String {
    format!("guest {name}: {}", state_name(state))
}

/// A guest after `define` or `update`: `defined guest web (stopped)`.
pub fn guest_changed(verb: &str, g: &GuestStatus) -> String {
    format!("{verb} guest {} ({})", g.spec.name, state_name(&g.state))
}

/// `guest show`: the runtime status, then the definition as the TOML it was defined from.
pub fn guest(g: &GuestStatus) -> String {
    let spec = toml::to_string(&g.spec).unwrap_or_default();
    let mut s = format!("state: {}\n", state_name(&g.state));
    if let Some(pid) = g.pid {
        s.push_str(&format!("pid: {pid}\n"));
    }
    if let Some(u) = g.uptime_secs {
        s.push_str(&format!("uptime: {}\n", secs(u)));
    }
    if let Some(why) = &g.crash_reason {
        s.push_str(&format!("crashed: {why}\n"));
    }
    if !g.snapshots.is_empty() {
        s.push_str(&format!("snapshots: {}\n", g.snapshots.join(", ")));
    }
    s.push('\n');
    s.push_str(&spec);
    s
}

/// `guest snapshot`: what was taken and what it cost.
pub fn snapshot_taken(s: &SnapshotStatus) -> String {
    format!(
        "snapshot {} of guest {} taken: {} of memory, {} on disk, guest paused {} ms",
        s.name,
        s.guest,
        bytes(s.memory_bytes),
        bytes(s.disk_bytes),
        s.paused_ms
    )
}

/// `guest snapshots`.
pub fn snapshots(list: &[SnapshotStatus]) -> String {
    if list.is_empty() {
        return "no snapshots".into();
    }
    let mut s = format!(
        "{:<24} {:>12} {:>12} {:>10}\n",
        "NAME", "MEMORY", "ON DISK", "AGE"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    for snap in list {
        s.push_str(&format!(
            "{:<24} {:>12} {:>12} {:>10}\n",
            snap.name,
            bytes(snap.memory_bytes),
            bytes(snap.disk_bytes),
            secs(now.saturating_sub(snap.created))
        ));
    }
    s
}

/// A Unix time as a UTC date (`2027-12-05 01:02 UTC`).
pub fn unix_date(t: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t)
        .map(|d| {
            format!(
                "{:04}-{:02}-{:02} {:02}:{:02} UTC",
                d.year(),
                u8::from(d.month()),
                d.day(),
                d.hour(),
                d.minute()
            )
        })
        .unwrap_or_else(|_| t.to_string())
}

/// One line of a migration's progress.
pub fn migration_progress(s: &MigrationStatus) -> String {
    let bar = 20usize;
    let done = if s.pass == 0 {
        ((s.bytes_sent * bar as u64) / s.memory_bytes.max(1)).min(bar as u64) as usize
    } else {
        bar
    };
    format!(
        "[{}{}] pass {}: {} sent, {} left, guest dirties {}/s, sending {}/s, expected downtime {} ms",
        "=".repeat(done),
        " ".repeat(bar - done),
        s.pass,
        bytes(s.bytes_sent),
        bytes(s.bytes_left),
        bytes(s.dirty_rate_bytes_per_sec),
        bytes(s.bandwidth_bytes_per_sec),
        s.expected_downtime_ms
    )
}

/// A migration's outcome.
pub fn migration_done(v: &MigrationView, from: &str, to: &str) -> String {
    let s = &v.status;
    match (&s.phase, &s.result) {
        (MigrationPhase::Completed, Some(r)) => format!(
            "guest {} migrated from {from} to {to}: downtime {} ms (last pass {} ms, device state \
             {} ms, transfer {} ms, resume {} ms); {} passes, {} sent in {} ms",
            v.guest,
            r.downtime_ms,
            r.last_pass_ms,
            r.state_ms,
            r.transfer_ms,
            r.resume_ms,
            r.passes,
            bytes(r.bytes_sent),
            r.total_ms
        ),
        (phase, _) => format!(
            "guest {} did not migrate ({}): {}",
            v.guest,
            state_name(phase),
            s.error.as_deref().unwrap_or("no reason given")
        ),
    }
}

/// `image list`.
pub fn images(list: &[ImageFile]) -> String {
    if list.is_empty() {
        return "no images".into();
    }
    let mut text = format!("{:<12} {}\n", "SIZE", "PATH");
    for f in list {
        text.push_str(&format!("{:<12} {}\n", bytes(f.size_bytes), f.path));
    }
    text
}

/// `requests`.
pub fn join_requests(list: &[JoinRecord]) -> String {
    if list.is_empty() {
        return "no join requests".into();
    }
    let mut text = format!(
        "{:<20} {:<9} {:<24} {:<12} {}\n",
        "HOSTNAME", "STATE", "URL", "NODE", "FINGERPRINT"
    );
    for r in list {
        text.push_str(&format!(
            "{:<20} {:<9} {:<24} {:<12} {}\n",
            r.hostname,
            state_name(&r.state),
            r.default_url(),
            r.node_name.as_deref().unwrap_or("-"),
            r.fingerprint
        ));
    }
    text
}

/// One node as `nodes` shows it. The fields are in alphabetical order because `nodes --json`
/// has always printed its keys so.
#[derive(Debug, Clone, Serialize)]
pub struct NodeRow {
    /// How the cluster sees it (`member`, `leader`, `lost`, with ` (maintenance)` for a member
    /// in maintenance mode), when a cluster is set up; why not
    /// known when etcd does not answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// The first error of the probes, if any.
    pub error: Option<String>,
    /// Pinned fingerprint.
    pub fingerprint: String,
    /// Guests running, when the node answered.
    pub guests_running: Option<u32>,
    /// Guests defined, when the node answered.
    pub guests_total: Option<u32>,
    /// The node's host name, when it answered.
    pub hostname: Option<String>,
    /// Name in nodes.toml.
    pub name: String,
    /// Whether a connection could be made at all.
    pub reachable: bool,
    /// Registration state, or what went wrong.
    pub state: String,
    /// Node URL.
    pub url: String,
}

/// `nodes`.
pub fn nodes(rows: &[NodeRow]) -> String {
    if rows.is_empty() {
        return "no nodes registered".into();
    }
    let cluster = rows.iter().any(|r| r.cluster.is_some());
    let mut text = format!(
        "{:<16} {:<28} {:<10} {:<18} {:<20} {:<7}{}\n",
        "NAME",
        "URL",
        "REACHABLE",
        "STATE",
        "HOSTNAME",
        "GUESTS",
        if cluster { " CLUSTER" } else { "" }
    );
    for r in rows {
        let guests = match (r.guests_running, r.guests_total) {
            (Some(run), Some(total)) => format!("{run}/{total}"),
            _ => "-".into(),
        };
        text.push_str(&format!(
            "{:<16} {:<28} {:<10} {:<18} {:<20} {:<7}{}\n",
            r.name,
            r.url,
            if r.reachable { "yes" } else { "no" },
            r.state,
            r.hostname.as_deref().unwrap_or("-"),
            guests,
            r.cluster
                .as_deref()
                .map(|c| format!(" {c}"))
                .unwrap_or_default()
        ));
    }
    text
}

/// One line of `events`.
pub fn event(ev: &Event) -> String {
    format!(
        "{:>6} {} {:<14} {:<12} {}",
        ev.seq,
        ev.timestamp,
        ev.kind,
        ev.guest.as_deref().unwrap_or("-"),
        ev.message
    )
}

/// Upload progress on stderr: a rewritten line on a terminal, a line per 10% otherwise.
#[derive(Debug)]
pub struct Progress {
    total: u64,
    done: u64,
    started: Instant,
    last: Instant,
    last_tenth: u64,
    tty: bool,
}

impl Progress {
    /// Progress towards `total` bytes, from now.
    pub fn new(total: u64) -> Self {
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
            bytes(self.done),
            bytes(self.total),
            bytes((self.done as f64 / secs) as u64)
        )
    }

    /// `n` more bytes sent.
    pub fn add(&mut self, n: u64) {
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

    /// The last line, once everything is sent.
    pub fn finish(&mut self) {
        if self.tty {
            eprintln!("\r{}   ", self.line());
        } else if self.last_tenth < 10 {
            eprintln!("{}", self.line());
        }
    }
}

/// `node slots`: the installed system's slots.
pub fn slots(v: &hvnode_api::update::UpdateView) -> String {
    let mut out = String::new();
    let Some(booted) = &v.booted_slot else {
        return format!(
            "hvnode {} runs from its boot medium: install it to a disk to have slots to update\n",
            v.running_version
        );
    };
    let confirmed = if v.confirmed {
        "confirmed"
    } else {
        "not confirmed"
    };
    out.push_str(&format!(
        "running hvnode {} from slot {booted} ({confirmed}); next boot: {}\n",
        v.running_version,
        v.next_boot.as_deref().unwrap_or("none bootable")
    ));
    if let Some(f) = &v.failed_update {
        out.push_str(&format!("{}\n", f.message));
    }
    out.push_str(&format!(
        "{:<5} {:<16} {:<9} {}\n",
        "SLOT", "VERSION", "BOOTABLE", "STATE"
    ));
    for s in &v.slots {
        let failed = v.failed_update.as_ref().is_some_and(|f| f.slot == s.name);
        let state = if s.booted {
            "running"
        } else if s.pending {
            "boots once next"
        } else if failed {
            "update failed"
        } else {
            ""
        };
        out.push_str(&format!(
            "{:<5} {:<16} {:<9} {state}\n",
            s.name,
            s.version.as_deref().unwrap_or("-"),
            if s.bootable { "yes" } else { "no" },
        ));
    }
    use hvnode_api::update::UpdateProgress as P;
    match &v.progress {
        P::Idle => {}
        P::Writing {
            slot,
            written_bytes,
            total_bytes,
            ..
        } => out.push_str(&format!(
            "writing slot {slot}: {} of {}\n",
            bytes(*written_bytes),
            total_bytes.map_or("?".to_owned(), bytes)
        )),
        P::Installed { slot, version } => {
            out.push_str(&format!("last update: {version} written to slot {slot}\n"))
        }
        P::Failed { slot, error } => {
            out.push_str(&format!("last update to slot {slot} failed: {error}\n"))
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_json_keeps_its_keys_in_alphabetical_order() {
        let row = NodeRow {
            cluster: Some("leader".into()),
            error: None,
            fingerprint: "AB".into(),
            guests_running: Some(1),
            guests_total: Some(2),
            hostname: None,
            name: "n1".into(),
            reachable: true,
            state: "registered".into(),
            url: "https://n1:8443".into(),
        };
        let typed = json(&row);
        let untyped = serde_json::to_value(&row).unwrap().to_string();
        assert_eq!(typed, untyped);
        let text = nodes(&[row]);
        assert!(text.contains("n1               https://n1:8443"), "{text}");
        assert!(
            text.contains("CLUSTER") && text.contains("1/2     leader"),
            "{text}"
        );
    }

    #[test]
    fn empty_lists_say_so() {
        assert_eq!(nodes(&[]), "no nodes registered");
        assert_eq!(guest_list(&[]), "no guests");
        assert_eq!(images(&[]), "no images");
        assert_eq!(join_requests(&[]), "no join requests");
    }
}
