//! `hvnode-console`: the node's console on tty1 and ttyS0. Talks only to the agent's unix socket.
//!
//! # Modules
//!
//! - `main` (here): the terminal (raw mode, the serial port's fixed 80x24 viewport), the loop
//!   that reads keys, hands actions to the worker, applies its answers and draws.
//! - `app`: the shared state (current screen, the agent's last answers, dialogs, requests in
//!   flight, refresh timing), key dispatch and the frame (tabs, banner, box, help line).
//! - `screens`: one module per screen, each with its own state, keys and lines.
//! - `netform`: the network form: its state and keys, its checks (`check`) and drawing (`view`).
//! - `state`: what the console knows and asks ([`state::Snapshot`], [`state::Action`], ...).
//! - `worker`: the thread that carries actions to the agent, one at a time, in order.
//! - `client`: a blocking HTTP/1.1 client of the agent's unix socket (httparse, timeouts).
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
