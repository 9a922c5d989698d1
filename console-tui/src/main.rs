//! `hvnode-console`: the node's console on tty1 and ttyS0. Talks only to the agent's unix socket.
//!
//! # Modules
//!
//! - `main` (here): the terminal (raw mode, the serial port's fixed 80x24 viewport) and the loop.
//! - `app`: the shared state (screen, dialogs, requests in flight, refresh timing) and the frame.
//! - `screens`: the tab order and what screens share ([`screens::Reaction`], line helpers).
//! - `screens::status`: node status at a glance; no state, no keys.
//! - `screens::network`: host name, NIC selection, a pending change's countdown; opens the form.
//! - `screens::manager`: pairing code, fingerprints, node-initiated registration.
//! - `screens::guests`: the guest list, the selected guest's detail and operations.
//! - `screens::storage`: the data partition, blank disks, initialising one.
//! - `screens::logs`: the node log or a guest's console log, scrolled.
//! - `screens::power`: reboot and power off, confirmed.
//! - `netform`: the network form's model (fields, state, constructors).
//! - `netform::keys`: the form's keys.
//! - `netform::check`: the form's text checked into a `NetworkConfig` or field errors.
//! - `netform::view`: the form drawn as lines.
//! - `state`: what the console knows and asks ([`state::Snapshot`], [`state::Action`], dialogs).
//! - `worker`: the thread that carries actions to the agent, one at a time, in order.
//! - `client`: blocking HTTP/1.1 over the agent's unix socket (httparse, timeouts, size cap).
//! - `testing` (tests only): fixtures: a node, an App holding it, keys, the screen as text.
//!
//! # A key and a refresh
//!
//! A key goes to [`App::on_key`]: an open question or form or field takes it first, then the
//! keys that switch screens, then the current screen's `on_key`, whose [`screens::Reaction`]
//! the App turns into a dialog or an [`state::Action`]. The loop hands every action, and the
//! refresh [`App::poll`] returns when one is due, to the [`Worker`], which performs them in
//! order with the [`Client`] (paths from `hvnode_api::routes::Route`) and posts each
//! [`state::Done`] back; the next turn gives it to [`App::apply`], which updates the shared
//! state and the screens'. Then the frame is drawn with the current screen's lines.
#![forbid(unsafe_code)]

mod app;
mod client;
mod netform;
mod screens;
mod state;
mod worker;

use std::time::{Duration, Instant};

use app::App;
use client::Client;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use ratatui::crossterm::{execute, terminal};
use ratatui::layout::Rect;
use ratatui::prelude::CrosstermBackend;
use ratatui::{Terminal, TerminalOptions, Viewport};
use worker::{Worker, WorkerGone};

/// How long the loop waits for a key before it looks for answers again: the delay with which
/// an answer reaches the screen.
const KEY_WAIT: Duration = Duration::from_millis(50);
/// How often the whole screen is repainted anyway: the kernel and init write to the same
/// consoles (a DHCP lease, a kernel warning), and the TUI only redraws cells it changed.
const REPAINT_EVERY: Duration = Duration::from_secs(30);

/// Ctrl-L, the terminal convention for "repaint the screen".
fn is_repaint_key(k: &KeyEvent) -> bool {
    k.code == KeyCode::Char('l') && k.modifiers.contains(KeyModifiers::CONTROL)
}

/// One turn of the UI loop at `now`: applies the answers that arrived, hands a key to the App,
/// and sends the worker what they caused and any refresh that is due.
fn turn(
    app: &mut App,
    worker: &Worker,
    key: Option<KeyEvent>,
    now: Instant,
) -> Result<(), WorkerGone> {
    while let Some(done) = worker.try_recv()? {
        app.apply(done, now);
    }
    if let Some(k) = key {
        for action in app.on_key(k) {
            worker.send(action)?;
        }
    }
    for action in app.poll(now) {
        worker.send(action)?;
    }
    app.tick(now);
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
    let worker = Worker::spawn(Client::new(socket))?;
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
    let mut drawn = app.screen;
    let mut painted = Instant::now();
    let mut key = None;
    loop {
        let now = Instant::now();
        let repaint = key.as_ref().is_some_and(is_repaint_key);
        if repaint {
            key = None;
        }
        turn(&mut app, &worker, key.take(), now).map_err(std::io::Error::other)?;
        if app.screen != drawn || repaint || now.duration_since(painted) >= REPAINT_EVERY {
            // A full redraw, so a terminal that missed output or was written over by the kernel
            // shows the whole screen.
            term.clear()?;
            drawn = app.screen;
            painted = now;
        }
        term.draw(|f| app::draw(f, &app))?;
        if event::poll(KEY_WAIT)? {
            if let Event::Key(k) = event::read()? {
                if k.kind == KeyEventKind::Press {
                    key = Some(k);
                }
            }
        }
    }
}

#[cfg(test)]
mod testing;
#[cfg(test)]
mod tests;
