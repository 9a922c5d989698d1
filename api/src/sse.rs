//! Server-sent events framing (the `GET /v1/events` stream): the agent encodes, clients parse.

use crate::event::Event;

/// One event as a server-sent-event frame: `id: SEQ`, `data: JSON`, a blank line.
pub fn frame(ev: &Event) -> String {
    let data = serde_json::to_string(ev).unwrap_or_default();
    format!("id: {}\ndata: {data}\n\n", ev.seq)
}

/// Splits a server-sent event stream into the `data` of each event. Comments (`: ...`), other
/// fields and `\r\n` line ends are handled as the SSE specification says.
#[derive(Debug, Default)]
pub struct Parser {
    buf: Vec<u8>,
    data: Vec<String>,
}

/// Longest line kept while waiting for its end: a peer that never sends a newline cannot make
/// the parser grow without bound.
pub const MAX_LINE: usize = 1 << 20;

impl Parser {
    /// Feeds bytes; returns the data of every event completed by them. A line longer than
    /// [`MAX_LINE`] is dropped.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<String> {
        self.buf.extend_from_slice(chunk);
        let mut events = Vec::new();
        while let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=pos).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                if !self.data.is_empty() {
                    events.push(self.data.join("\n"));
                    self.data.clear();
                }
            } else if let Some(rest) = line.strip_prefix("data:") {
                self.data
                    .push(rest.strip_prefix(' ').unwrap_or(rest).to_owned());
            }
        }
        if self.buf.len() > MAX_LINE {
            self.buf.clear();
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_split_chunks_and_ignores_comments() {
        let mut p = Parser::default();
        assert!(p.push(b": keep-alive\n\nid: 1\nda").is_empty());
        assert_eq!(
            p.push(b"ta: {\"seq\":1}\r\n\r\ndata: a\ndata: b\n\n"),
            vec!["{\"seq\":1}".to_owned(), "a\nb".to_owned()]
        );
    }

    #[test]
    fn a_frame_parses_back_to_its_event() {
        let ev = Event {
            seq: 7,
            timestamp: 1,
            kind: "guest_state".into(),
            guest: Some("web".into()),
            message: "running\nnow".into(),
        };
        let mut p = Parser::default();
        let got = p.push(frame(&ev).as_bytes());
        assert_eq!(got.len(), 1);
        assert_eq!(serde_json::from_str::<Event>(&got[0]).unwrap(), ev);
    }

    #[test]
    fn an_endless_line_is_dropped() {
        let mut p = Parser::default();
        p.push(&vec![b'x'; MAX_LINE + 1]);
        assert_eq!(p.push(b"\ndata: ok\n\n"), vec!["ok".to_owned()]);
    }
}
