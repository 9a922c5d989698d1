//! `events`: follows the node's server-sent event stream, a line per event.

use futures_util::StreamExt;
use http_body_util::BodyExt;
use hvnode_api::event::Event;
use hvnode_api::routes::Route;
use hvnode_api::sse;
use hyper::Method;

use super::{path_with, CmdError, Ctx};
use crate::client::{ClientError, ReqBody};
use crate::output;

impl Ctx {
    /// Prints events after `since` until `count` were printed (or the stream ends, an error:
    /// the agent never ends it on its own).
    pub(super) async fn events(
        &self,
        node: &str,
        since: Option<u64>,
        count: Option<u64>,
    ) -> Result<(), CmdError> {
        let c = self.connect(node)?;
        let path = path_with(&Route::Events, "since", since);
        let empty: ReqBody =
            BodyExt::boxed(http_body_util::Empty::new().map_err(|never| match never {}));
        let mut req = c.request(Method::GET, &path, empty);
        req.headers_mut().insert(
            hyper::header::ACCEPT,
            hyper::header::HeaderValue::from_static("text/event-stream"),
        );
        let resp = c.send(req).await?;
        let mut body = resp.into_body().into_data_stream();
        let mut parser = sse::Parser::default();
        let mut seen = 0u64;
        if count == Some(0) {
            return Ok(());
        }
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| ClientError::Http {
                node: node.to_owned(),
                source: e,
            })?;
            for data in parser.push(&chunk) {
                let line = if self.json {
                    data
                } else {
                    // An event this build cannot read is shown as it came.
                    serde_json::from_str::<Event>(&data)
                        .map(|ev| output::event(&ev))
                        .unwrap_or(data)
                };
                output::text(&line)?;
                seen += 1;
                if count.is_some_and(|n| seen >= n) {
                    return Ok(());
                }
            }
        }
        Err(CmdError::StreamEnded)
    }
}
