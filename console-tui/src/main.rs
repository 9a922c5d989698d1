//! `hvnode-console`: the node's console on tty1 and ttyS0. Talks only to the agent's unix socket.
#![forbid(unsafe_code)]

mod app;
mod client;
mod netform;

use std::time::{Duration, Instant};

use app::{Action, App, Snapshot};
use client::{Client, ClientError};
use hvnode_api::node::{Hostname, NetworkView, StorageInit};
use hvnode_api::registration::{AcceptManager, ManagerCandidate, ManagerUrl};
use ratatui::crossterm::event::{self, Event, KeyEventKind};
use ratatui::crossterm::{execute, terminal};
use ratatui::layout::Rect;
use ratatui::prelude::CrosstermBackend;
use ratatui::{Terminal, TerminalOptions, Viewport};

fn fetch(c: &Client) -> Result<Snapshot, ClientError> {
    Ok(Snapshot {
        registration: c.get("/v1/registration")?,
        info: c.get("/v1/node")?,
        stats: c.get("/v1/stats")?,
        guests: c.get("/v1/guests")?,
        storage: c.get("/v1/storage")?,
    })
}

fn refresh(app: &mut App, c: &Client) {
    match fetch(c) {
        Ok(s) => {
            app.data = Some(s);
            app.unreachable = None;
        }
        Err(ClientError::Unreachable(_, why)) => app.unreachable = Some(why),
        Err(e) => app.message = Some(e.to_string()),
    }
    match c.get::<NetworkView>("/v1/network") {
        Ok(v) => app.set_network(v, Instant::now()),
        Err(ClientError::Unreachable(_, why)) => app.unreachable = Some(why),
        Err(e) => app.network_error = Some(e.to_string()),
    }
    if app.screen == app::Screen::Logs && app.log_title == "Node log" {
        if let Ok(t) = c.get_text("/v1/logs?lines=500") {
            app.log_text = t;
        }
    }
}

fn run_action(app: &mut App, c: &Client, action: Action) {
    let result = match &action {
        Action::SetHostname(h) => c.send(
            "PUT",
            "/v1/node/hostname",
            Some(&Hostname {
                hostname: h.clone(),
            }),
        ),
        Action::Power(p) => c.send("POST", "/v1/power", Some(p)),
        Action::Guest(name, op) => c.send::<()>("POST", &format!("/v1/guests/{name}/{op}"), None),
        Action::GuestConsole(name) => c.get_text(&format!("/v1/guests/{name}/console")).map(|t| {
            app.log_text = t;
            app.log_title = format!("Console of {name}");
            app.scroll = 0;
            app.screen = app::Screen::Logs;
        }),
        Action::NewPairingCode => c.send::<()>("POST", "/v1/registration/pairing-code", None),
        Action::Unregister => c.send::<()>("DELETE", "/v1/registration", None),
        Action::FetchManager(url) => c
            .request(
                "POST",
                "/v1/registration/manager",
                serde_json::to_vec(&ManagerUrl { url: url.clone() })
                    .ok()
                    .as_deref(),
            )
            .and_then(|r| {
                serde_json::from_slice::<ManagerCandidate>(&r.body)
                    .map_err(|e| ClientError::Protocol(e.to_string()))
            })
            .map(|cand| app.candidate = Some(cand)),
        Action::AcceptManager(fp) => c.send(
            "POST",
            "/v1/registration/manager/accept",
            Some(&AcceptManager {
                ca_fingerprint: fp.clone(),
            }),
        ),
        Action::RejectManager => c.send::<()>("POST", "/v1/registration/manager/reject", None),
        Action::InitStorage(dev) => c.send(
            "POST",
            "/v1/storage/init",
            Some(&StorageInit {
                device: dev.clone(),
                confirm: dev.clone(),
            }),
        ),
        Action::ApplyNetwork(config) => network_call(app, c, "PUT", "/v1/network", Some(config)),
        Action::ConfirmNetwork => network_call(app, c, "POST", "/v1/network/confirm", None),
        Action::RollbackNetwork => network_call(app, c, "POST", "/v1/network/rollback", None),
    };
    app.message = Some(match result {
        Ok(()) => match action {
            Action::ApplyNetwork(_) => {
                "Applied: it rolls back in 60 s unless you press c to keep it.".to_owned()
            }
            Action::ConfirmNetwork => "Kept: the change is saved in node.toml.".to_owned(),
            Action::RollbackNetwork => "Rolled back to the saved configuration.".to_owned(),
            _ => "Done.".to_owned(),
        },
        Err(e) => format!("Failed: {e}"),
    });
    refresh(app, c);
}

/// A network request whose answer is the new network view.
fn network_call(
    app: &mut App,
    c: &Client,
    method: &str,
    path: &str,
    body: Option<&hvnode_api::config::NetworkConfig>,
) -> Result<(), ClientError> {
    let view: NetworkView = c.call(method, path, body, Duration::from_secs(30))?;
    app.set_network(view, Instant::now());
    Ok(())
}

fn main() {
    let mut socket = hvnode_api::paths::AGENT_SOCKET.to_owned();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match (a.as_str(), args.next()) {
            ("--socket", Some(p)) => socket = p,
            _ => {
                eprintln!("usage: hvnode-console [--socket PATH]");
                std::process::exit(2);
            }
        }
    }
    if let Err(e) = run(&socket) {
        eprintln!("hvnode-console: {e}");
        std::process::exit(1);
    }
}

fn run(socket: &str) -> std::io::Result<()> {
    let client = Client::new(socket);
    let mut app = App::new(socket);
    terminal::enable_raw_mode()?;
    let mut out = std::io::stdout();
    execute!(out, terminal::EnterAlternateScreen)?;
    // Serial terminals report no size; the console is designed for 80x24.
    let (w, h) = terminal::size().unwrap_or((0, 0));
    let viewport = if w < 80 || h < 24 {
        Viewport::Fixed(Rect::new(0, 0, 80, 24))
    } else {
        Viewport::Fullscreen
    };
    let mut term =
        Terminal::with_options(CrosstermBackend::new(out), TerminalOptions { viewport })?;
    term.clear()?;
    let mut last = Instant::now() - Duration::from_secs(10);
    loop {
        if last.elapsed() >= Duration::from_secs(2) {
            refresh(&mut app, &client);
            last = Instant::now();
        }
        app.tick(Instant::now());
        term.draw(|f| app::draw(f, &app))?;
        if event::poll(Duration::from_millis(250))? {
            if let Event::Key(k) = event::read()? {
                if k.kind != KeyEventKind::Press {
                    continue;
                }
                let before = app.screen;
                for action in app.on_key(k) {
                    run_action(&mut app, &client, action);
                }
                if app.screen != before {
                    refresh(&mut app, &client);
                    last = Instant::now();
                    // A full redraw, so a terminal that missed output shows the whole screen.
                    term.clear()?;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
