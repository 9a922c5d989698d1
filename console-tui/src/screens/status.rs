//! The Status screen: host name, version, registration, guests, CPU and memory, uptime, the
//! API's URL, the node certificate's fingerprint and each NIC. No state and no keys of its own.

use hvnode_api::units::bytes;
use ratatui::text::Line;

use super::{fingerprint_halves, kv, reg_state};
use crate::state::Snapshot;

/// The screen's lines.
pub fn lines(d: &Snapshot) -> Vec<Line<'static>> {
    let mut l = vec![
        kv("Host name", d.info.hostname.clone()),
        kv(
            "Version",
            format!("hvnode {} (kernel {})", d.info.version, d.info.kernel),
        ),
        kv("Manager", reg_state(&d.registration)),
    ];
    let running = super::running_guests(Some(d));
    l.push(kv(
        "Guests",
        format!("{running} running / {} defined", d.guests.len()),
    ));
    l.push(kv(
        "CPU / memory",
        format!(
            "{:.0}% of {} CPUs, {} / {}",
            d.stats.cpu_percent,
            d.info.cpus,
            bytes(d.stats.memory_used_bytes),
            bytes(d.stats.memory_total_bytes)
        ),
    ));
    let up = d.stats.uptime_secs;
    l.push(kv(
        "Uptime",
        format!("{}d {:02}:{:02}", up / 86400, up / 3600 % 24, up / 60 % 60),
    ));
    let first_addr = d
        .info
        .nics
        .iter()
        .flat_map(|n| n.addresses.iter())
        .find(|a| !a.contains(':'))
        .and_then(|a| a.split('/').next())
        .map(str::to_owned);
    l.push(kv(
        "API",
        first_addr
            .map(|a| format!("https://{a}:8443"))
            .unwrap_or_else(|| "no address yet".into()),
    ));
    let (first, second) = fingerprint_halves(&d.registration.node_fingerprint);
    l.push(kv("Fingerprint", first));
    l.push(kv("", second));
    l.push(Line::raw(""));
    for n in &d.info.nics {
        l.push(Line::raw(format!(
            "{:<10} {:<17} {:<5} {}",
            n.name,
            n.mac,
            if n.carrier { "up" } else { "down" },
            n.addresses.join(" ")
        )));
    }
    l
}

#[cfg(test)]
mod tests {
    use crate::testing::{app, render};

    #[test]
    fn status_screen_shows_identity_address_and_registration() {
        let s = render(&app());
        for want in [
            "rack7-node1",
            "10.0.2.15",
            "Unregistered",
            "https://10.0.2.15:8443",
            "AB:AB",
            "1 running / 2 defined",
            "52:54:00:12:34:56",
        ] {
            assert!(s.contains(want), "{want:?} missing:\n{s}");
        }
    }
}
