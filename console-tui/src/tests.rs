//! The UI loop ([`crate::turn`]) against a scripted agent on a real unix socket, and the keys
//! the loop handles itself.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hvnode_api::guest::GuestState;
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

use crate::app::{App, Screen, Snapshot};
use crate::client::Client;
use crate::testing::{banner, key, network_view, render, snapshot};
use crate::worker::Worker;

/// A scripted agent on a unix socket: answers the refresh's GETs from `snapshot()`, and a start
/// of web-1 after `delay`, as a slow VMM would.
struct FakeAgent {
    path: PathBuf,
    requests: Arc<Mutex<Vec<String>>>,
}

impl FakeAgent {
    fn start(name: &str, delay: Duration) -> FakeAgent {
        let dir =
            std::env::temp_dir().join(format!("hvnode-console-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("agent.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&requests);
        std::thread::spawn(move || {
            let mut snap = snapshot();
            set_guest(&mut snap, GuestState::Stopped, None);
            for stream in listener.incoming() {
                let Ok(mut s) = stream else { return };
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let line = String::from_utf8_lossy(&head)
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                seen.lock().unwrap().push(line.clone());
                let json = |v: serde_json::Result<String>| (200, v.unwrap());
                let (status, body) = match line.split(' ').take(2).collect::<Vec<_>>()[..] {
                    ["GET", "/v1/registration"] => json(serde_json::to_string(&snap.registration)),
                    ["GET", "/v1/node"] => json(serde_json::to_string(&snap.info)),
                    ["GET", "/v1/stats"] => json(serde_json::to_string(&snap.stats)),
                    ["GET", "/v1/guests"] => json(serde_json::to_string(&snap.guests)),
                    ["GET", "/v1/storage"] => json(serde_json::to_string(&snap.storage)),
                    ["GET", "/v1/cluster"] => json(serde_json::to_string(&snap.cluster)),
                    ["GET", "/v1/network"] => json(serde_json::to_string(&network_view())),
                    ["POST", "/v1/guests/web-1/start"] => {
                        std::thread::sleep(delay);
                        set_guest(&mut snap, GuestState::Running, Some(5));
                        json(serde_json::to_string(&snap.guests[0]))
                    }
                    _ => (
                        404,
                        r#"{"code":"not_found","message":"No such route"}"#.to_owned(),
                    ),
                };
                let _ = write!(
                    s,
                    "HTTP/1.1 {status} X\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        FakeAgent { path, requests }
    }

    fn seen(&self, line: &str) -> usize {
        let r = self.requests.lock().unwrap();
        r.iter().filter(|l| l.starts_with(line)).count()
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        if let Some(dir) = self.path.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn set_guest(s: &mut Snapshot, state: GuestState, uptime: Option<u64>) {
    s.guests[0].state = state;
    s.guests[0].uptime_secs = uptime;
}

/// Runs loop turns without keys until `done` holds, for at most `limit`.
fn turns_until(a: &mut App, w: &Worker, limit: Duration, done: impl Fn(&App) -> bool) {
    let start = Instant::now();
    while !done(a) {
        assert!(
            start.elapsed() < limit,
            "not within {limit:?}:\n{}",
            render(a)
        );
        crate::turn(a, w, None, Instant::now()).unwrap();
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn keys_keep_working_while_the_agent_takes_two_seconds_to_answer() {
    let agent = FakeAgent::start("slow", Duration::from_secs(2));
    let worker = Worker::spawn(Client::new(&agent.path)).unwrap();
    let mut a = App::new(&agent.path.display().to_string());
    turns_until(&mut a, &worker, Duration::from_secs(5), |a| {
        a.data.is_some()
    });
    crate::turn(
        &mut a,
        &worker,
        Some(key(KeyCode::Char('4'))),
        Instant::now(),
    )
    .unwrap();
    assert!(render(&a).contains("stopped"), "{}", render(&a));
    let sent = Instant::now();
    crate::turn(
        &mut a,
        &worker,
        Some(key(KeyCode::Char('s'))),
        Instant::now(),
    )
    .unwrap();
    assert!(
        sent.elapsed() < Duration::from_millis(500),
        "sending waited {:?} for the agent",
        sent.elapsed()
    );

    // For most of the agent's two seconds: every key is handled at once (the bound leaves room
    // for a loaded machine, far below the agent's delay), the screen says what the agent is
    // doing, and nothing has been applied yet.
    let keys = [
        key(KeyCode::Char('1')),
        key(KeyCode::Char('4')),
        key(KeyCode::Char('t')),
        key(KeyCode::Esc),
    ];
    let mut turns = 0;
    while sent.elapsed() < Duration::from_millis(1700) {
        let k = keys[turns % keys.len()];
        let before = Instant::now();
        crate::turn(&mut a, &worker, Some(k), Instant::now()).unwrap();
        assert!(
            before.elapsed() < Duration::from_millis(500),
            "a turn waited {:?} for the agent",
            before.elapsed()
        );
        let s = render(&a);
        assert_eq!(banner(&a), "Starting web-1...", "{s}");
        match k.code {
            KeyCode::Char('1') => {
                assert_eq!(a.screen, Screen::Status);
                assert!(s.contains("rack7-node1"), "{s}");
            }
            KeyCode::Char('t') => assert!(s.contains("Stop (power off at once) guest web-1?")),
            KeyCode::Esc => assert!(a.confirm.is_none() && a.screen == Screen::Guests),
            _ => assert_eq!(a.screen, Screen::Guests),
        }
        turns += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(turns > 10, "only {turns} turns in 1.7 s");
    // The loop may have ended on `t`, with its confirmation still open: close it first.
    for k in [KeyCode::Esc, KeyCode::Char('4')] {
        crate::turn(&mut a, &worker, Some(key(k)), Instant::now()).unwrap();
    }
    assert!(a.confirm.is_none());
    assert!(render(&a).contains("> web-1"), "{}", render(&a));
    assert!(render(&a).contains("not running"), "{}", render(&a));

    turns_until(&mut a, &worker, Duration::from_secs(5), |a| {
        a.busy().is_none()
    });
    assert!(sent.elapsed() >= Duration::from_secs(2));
    assert_eq!(banner(&a), "Done: web-1 is running.");
    let s = render(&a);
    assert!(s.contains("running") && s.contains("up 00:00:05"), "{s}");
    assert_eq!(agent.seen("POST /v1/guests/web-1/start "), 1);
    // The refresh that fell due meanwhile waited behind the start: one, not one per 2 s.
    turns_until(&mut a, &worker, Duration::from_secs(5), |_| {
        agent.seen("GET /v1/registration ") >= 2
    });
    assert!(agent.seen("GET /v1/registration ") <= 3);
}

#[test]
fn ctrl_l_repaints_and_a_plain_l_does_not() {
    let ctrl_l = KeyEvent::new(KeyCode::Char('l'), KeyModifiers::CONTROL);
    assert!(crate::is_repaint_key(&ctrl_l));
    assert!(!crate::is_repaint_key(&key(KeyCode::Char('l'))));
}
