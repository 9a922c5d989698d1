//! The Manager screen: the registration state, the pairing code and the node's fingerprint for a
//! manager to register the node; `m` starts node-initiated registration (a manager's URL, then
//! its CA fingerprint to compare, `a` accept or `r` reject); `n` a new code; `u` unregister.

use hvnode_api::registration::ManagerCandidate;
use ratatui::crossterm::event::{KeyCode, KeyEvent};
use ratatui::text::Line;

use super::{fingerprint_halves, kv, reg_state, Reaction};
use crate::state::{Action, Confirm, Field, FieldKind, Snapshot};

/// The screen's state.
#[derive(Debug, Clone, Default)]
pub struct ManagerScreen {
    /// The manager fetched for node-initiated registration, awaiting accept or reject.
    pub candidate: Option<ManagerCandidate>,
}

impl ManagerScreen {
    /// The screen's keys.
    pub fn on_key(&mut self, key: KeyEvent) -> Reaction {
        match key.code {
            KeyCode::Char('n') => Reaction::Send(Action::NewPairingCode),
            KeyCode::Char('u') => Reaction::Ask(Confirm {
                text: "Unregister from the manager? It loses control of this node.".into(),
                action: Action::Unregister,
            }),
            KeyCode::Char('m') => Reaction::Edit(Field::new(
                FieldKind::ManagerUrl,
                "Manager URL",
                "https://".into(),
            )),
            KeyCode::Char('a') => match self.candidate.take() {
                Some(c) => Reaction::Send(Action::AcceptManager(c.ca_fingerprint)),
                None => Reaction::Nothing,
            },
            KeyCode::Char('r') if self.candidate.is_some() => {
                self.candidate = None;
                Reaction::Send(Action::RejectManager)
            }
            _ => Reaction::Nothing,
        }
    }

    /// The screen's lines.
    pub fn lines(&self, d: &Snapshot) -> Vec<Line<'static>> {
        let r = &d.registration;
        let mut l = vec![kv("State", reg_state(r))];
        if let Some(code) = &r.pairing_code {
            l.push(Line::raw(format!("Pairing code: {code}")));
        }
        let (first, second) = fingerprint_halves(&r.node_fingerprint);
        l.push(kv("Node fingerprint", first));
        l.push(kv("", second));
        l.push(Line::raw(""));
        if let Some(c) = &self.candidate {
            l.push(kv("Manager", format!("{} at {}", c.manager_name, c.url)));
            let (first, second) = fingerprint_halves(&c.ca_fingerprint);
            l.push(kv("CA fingerprint", first));
            l.push(kv("", second));
            l.push(Line::raw(
                "Compare it with the manager's; a: accept  r: reject",
            ));
        } else {
            l.push(Line::raw(
                "A manager registers this node with the code and fingerprint above,",
            ));
            l.push(Line::raw(
                "or press m to enter a manager's URL.  n: new code  u: unregister",
            ));
        }
        l
    }
}

/// The manager URL field's text checked (`https://HOST[:PORT]`, nothing after the host): the
/// request, or the inline error.
pub fn manager_url(v: String) -> Result<Action, String> {
    let rest = v
        .strip_prefix("https://")
        .ok_or("The URL must start with https://")?;
    let host = rest.trim_end_matches('/');
    if host.is_empty() || host.contains('/') || host.contains(' ') {
        return Err("Use https://HOST[:PORT]".into());
    }
    if let Some((_, port)) = host.rsplit_once(':').filter(|_| !host.ends_with(']')) {
        port.parse::<u16>()
            .map_err(|_| format!("Invalid port {port:?}"))?;
    }
    Ok(Action::FetchManager(v))
}

#[cfg(test)]
mod tests {
    use ratatui::crossterm::event::KeyCode;

    use super::manager_url;
    use crate::state::Action;
    use crate::testing::{app, key, render};

    #[test]
    fn manager_url_must_be_https() {
        let mut a = app();
        a.on_key(key(KeyCode::Char('3')));
        a.on_key(key(KeyCode::Char('m')));
        for _ in 0..8 {
            a.on_key(key(KeyCode::Backspace));
        }
        for c in "http://x".chars() {
            a.on_key(key(KeyCode::Char(c)));
        }
        assert!(a.on_key(key(KeyCode::Enter)).is_empty());
        assert!(render(&a).contains("https://"));
    }

    #[test]
    fn manager_url_takes_a_host_and_port_and_nothing_after() {
        for ok in [
            "https://mgr.example",
            "https://mgr.example:8443/",
            "https://[::1]:8443",
        ] {
            assert_eq!(manager_url(ok.into()), Ok(Action::FetchManager(ok.into())));
        }
        for (bad, why) in [
            ("http://mgr.example", "must start with https://"),
            ("https://", "Use https://HOST[:PORT]"),
            ("https://mgr.example/v1", "Use https://HOST[:PORT]"),
            ("https://mgr.example:99999", "Invalid port \"99999\""),
        ] {
            let e = manager_url(bad.into()).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
