//! `GET /v1/events`: the event log as a server-sent-events stream.

use tokio::sync::{broadcast, mpsc};

use super::{sse_frame, ChannelBody};

impl crate::Agent {
    /// `GET /v1/events?since=SEQ`: the events after `since` still kept, then every new one, as
    /// server-sent events. A client too slow for the broadcast skips what it missed.
    pub(crate) fn event_stream(
        &self,
        since: Option<String>,
    ) -> Result<crate::http::Resp, crate::error::Error> {
        use http_body_util::BodyExt;
        let since = crate::http::query_number("since", since, u64::MAX)?.unwrap_or(0);
        let (backlog, mut live) = self.events.subscribe(since);
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            for ev in &backlog {
                if tx.send(sse_frame(ev)).await.is_err() {
                    return;
                }
            }
            loop {
                match live.recv().await {
                    Ok(ev) => {
                        if tx.send(sse_frame(&ev)).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        let mut r = hyper::Response::new(ChannelBody(rx).boxed());
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("text/event-stream"),
        );
        Ok(r)
    }
}
