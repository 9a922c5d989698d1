//! `image ...`: the node's image directory: list, upload (streamed, with progress on
//! stderr) and delete.

use std::path::Path;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hvnode_api::guest;
use hvnode_api::node::ImageFile;
use hvnode_api::routes::Route;
use hvnode_api::units;
use hyper::body::Frame;
use hyper::Method;
use tokio::io::AsyncReadExt;

use super::{CmdError, Ctx};
use crate::cli::ImageCommand;
use crate::client::{NodeClient, ReqBody};
use crate::output::{self, Progress};

/// Size of the chunks an upload is read and sent in.
const UPLOAD_CHUNK: usize = 256 * 1024;

impl Ctx {
    pub(super) async fn image_cmd(&self, cmd: ImageCommand) -> Result<(), CmdError> {
        match cmd {
            ImageCommand::List(a) => {
                let c = self.connect(&a.node)?;
                let (list, raw): (Vec<ImageFile>, _) = c.get_json(&Route::Images.path()).await?;
                self.answer(&raw, || output::images(&list))
            }
            ImageCommand::Upload {
                node,
                local_file,
                remote_path,
            } => {
                guest::validate_image_path(&remote_path)?;
                let c = self.client(&node)?;
                self.upload(&c, &local_file, &remote_path).await
            }
            ImageCommand::Delete { node, path } => {
                guest::validate_image_path(&path)?;
                let c = self.connect(&node)?;
                c.call(Method::DELETE, &Route::Image(path.clone()).path(), None, "")
                    .await?;
                self.answer(b"{}", || format!("deleted {path}"))
            }
        }
    }

    async fn upload(&self, c: &NodeClient, local: &Path, remote: &str) -> Result<(), CmdError> {
        let (raw, size) = self
            .stream_file(c, local, &Route::Image(remote.to_owned()).path())
            .await?;
        // An upload may be answered with no body; `--json` still prints an object.
        let raw: &[u8] = if raw.is_empty() { b"{}" } else { &raw };
        self.answer(raw, || {
            format!(
                "uploaded {} ({}) to {remote}",
                local.display(),
                units::bytes(size)
            )
        })
    }

    /// Streams `local` as the body of a PUT to `path` with progress on stderr; the answer's
    /// body (checked for an error status by the client) and the file's size.
    pub(super) async fn stream_file(
        &self,
        c: &NodeClient,
        local: &Path,
        path: &str,
    ) -> Result<(Bytes, u64), CmdError> {
        let file = tokio::fs::File::open(local)
            .await
            .map_err(|e| CmdError::ReadFile(local.to_owned(), e))?;
        let size = file
            .metadata()
            .await
            .map_err(|e| CmdError::ReadFile(local.to_owned(), e))?
            .len();
        self.connecting(c);
        let progress = Progress::new(size);
        let stream =
            futures_util::stream::unfold((file, progress), |(mut file, mut progress)| async move {
                let mut buf = vec![0u8; UPLOAD_CHUNK];
                match file.read(&mut buf).await {
                    Ok(0) => {
                        progress.finish();
                        None
                    }
                    Ok(n) => {
                        buf.truncate(n);
                        progress.add(n as u64);
                        Some((Ok(Frame::data(Bytes::from(buf))), (file, progress)))
                    }
                    Err(e) => Some((Err(e), (file, progress))),
                }
            });
        let body: ReqBody = BodyExt::boxed(StreamBody::new(stream));
        let mut req = c.request(Method::PUT, path, body);
        let headers = req.headers_mut();
        headers.insert(hyper::header::CONTENT_LENGTH, size.into());
        headers.insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/octet-stream"),
        );
        let resp = c.send(req).await?;
        let raw = resp
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        Ok((raw, size))
    }
}
