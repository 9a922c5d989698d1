//! The agent's events: a ring of the last [`KEEP`] and a broadcast to every `GET /v1/events`
//! stream (server-sent events, served by [`stream`]). A leaf: the domains that emit events use
//! it, it uses none of them.

pub mod stream;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};

use bytes::Bytes;
use hvnode_api::event::Event;
use hyper::body::Frame;
use tokio::sync::{broadcast, mpsc};

/// Events kept for clients that reconnect with `?since=`.
pub const KEEP: usize = 1000;

/// The event log.
#[derive(Debug)]
pub struct EventLog {
    ring: Mutex<(u64, VecDeque<Event>)>,
    tx: broadcast::Sender<Event>,
}

impl Default for EventLog {
    fn default() -> Self {
        EventLog {
            ring: Mutex::new((1, VecDeque::new())),
            tx: broadcast::channel(256).0,
        }
    }
}

impl EventLog {
    /// Records and broadcasts an event; callable from any thread.
    pub fn emit(&self, kind: &str, guest: Option<&str>, message: impl Into<String>) {
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let ev = Event {
            seq: ring.0,
            timestamp: crate::unix_secs(),
            kind: kind.to_owned(),
            guest: guest.map(str::to_owned),
            message: message.into(),
        };
        ring.0 += 1;
        if ring.1.len() == KEEP {
            ring.1.pop_front();
        }
        ring.1.push_back(ev.clone());
        let _ = self.tx.send(ev);
    }

    /// Events with a sequence number above `since`, and a receiver for the ones to come (taken
    /// under the same lock, so none is lost or repeated in between).
    pub fn subscribe(&self, since: u64) -> (Vec<Event>, broadcast::Receiver<Event>) {
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let backlog = ring.1.iter().filter(|e| e.seq > since).cloned().collect();
        (backlog, self.tx.subscribe())
    }
}

/// One event as a server-sent-event frame.
pub fn sse_frame(ev: &Event) -> Bytes {
    Bytes::from(hvnode_api::sse::frame(ev))
}

/// A response body fed by a channel: the SSE stream.
#[derive(Debug)]
pub struct ChannelBody(pub mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_a_bounded_ring_and_replays_after_since() {
        let log = EventLog::default();
        for i in 0..(KEEP + 5) {
            log.emit("guest_state", Some("g"), format!("event {i}"));
        }
        let (all, _) = log.subscribe(0);
        assert_eq!(all.len(), KEEP);
        assert_eq!(all[0].seq, 6);
        let (tail, mut rx) = log.subscribe((KEEP + 3) as u64);
        assert_eq!(tail.len(), 2);
        log.emit("power", None, "reboot");
        assert_eq!(rx.try_recv().unwrap().kind, "power");
        let frame = sse_frame(&tail[0]);
        assert!(frame.starts_with(b"id: 1004\ndata: {"));
    }
}
