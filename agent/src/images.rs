//! The node's image directory (guest kernels, initrds and disks): listing, streamed uploads
//! (temp file, fsync, rename; never a half-written image under its name) and deletion. Paths are
//! confined below the directory.

use http_body_util::BodyExt;
use hvnode_api::error::ErrorCode;
use hvnode_api::node::ImageFile;
use hyper::StatusCode;

use crate::error::Error;
use crate::http::{json_response, no_content, Resp};
use crate::Agent;

/// Largest image accepted.
pub const IMAGE_LIMIT: u64 = 16 << 30;

fn check_path(rel: &str) -> Result<(), Error> {
    hvnode_api::guest::validate_image_path(rel)
        .map_err(|e| Error::new(ErrorCode::InvalidPath, e.to_string()))
}

impl Agent {
    /// Where an upload to `rel` goes: below the image directory, or for `DOMAIN:path` below that
    /// storage domain's mount point, which must be mounted (an upload never fills the empty
    /// directory under a missing mount).
    async fn upload_target(&self, rel: &str) -> Result<std::path::PathBuf, Error> {
        let Some((domain, path)) = hvnode_api::cluster::domain_path(rel) else {
            return Ok(self.paths.images.join(rel));
        };
        check_path(path)?;
        let root = crate::domains::mount_point(&self.paths.run, domain);
        let r = root.clone();
        let mounted = tokio::task::spawn_blocking(move || crate::domains::is_mounted(&r))
            .await
            .unwrap_or(false);
        if !mounted {
            return Err(Error::new(
                ErrorCode::InvalidPath,
                format!("Storage domain {domain:?} is not mounted on this node"),
            ));
        }
        Ok(root.join(path))
    }

    /// `GET /v1/images`: every file below the image directory, by path.
    pub(crate) fn images(&self) -> Resp {
        fn walk(root: &std::path::Path, dir: &std::path::Path, out: &mut Vec<ImageFile>) {
            let Ok(rd) = std::fs::read_dir(dir) else {
                return;
            };
            for e in rd.flatten() {
                let p = e.path();
                let Ok(meta) = e.metadata() else { continue };
                if meta.is_dir() {
                    walk(root, &p, out);
                } else if meta.is_file() && !e.file_name().to_string_lossy().starts_with('.') {
                    let path = p
                        .strip_prefix(root)
                        .unwrap_or(&p)
                        .to_string_lossy()
                        .into_owned();
                    out.push(ImageFile {
                        path,
                        size_bytes: meta.len(),
                    });
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.paths.images, &self.paths.images, &mut out);
        out.sort_by(|a, b| a.path.cmp(&b.path));
        json_response(StatusCode::OK, &out)
    }

    /// `DELETE /v1/images/{path}`.
    pub(crate) fn delete_image(&self, rel: &str) -> Result<Resp, Error> {
        check_path(rel)?;
        std::fs::remove_file(self.paths.images.join(rel))
            .map_err(|_| Error::new(ErrorCode::ImageNotFound, format!("No image {rel:?}")))?;
        Ok(no_content())
    }

    /// `PUT /v1/images/{path}`: streams the body to a temp file beside the target, then fsync
    /// and rename; at most [`IMAGE_LIMIT`] bytes.
    pub(crate) async fn upload_image<B>(&self, rel: &str, mut body: B) -> Result<Resp, Error>
    where
        B: hyper::body::Body<Data = bytes::Bytes> + Send + Unpin,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        use tokio::io::AsyncWriteExt;
        check_path(rel)?;
        let dest = self.upload_target(rel).await?;
        let dir = dest.parent().unwrap_or(&self.paths.images).to_owned();
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| Error::internal("Image directory", e))?;
        let tmp = dir.join(format!(
            ".upload-{}-{}",
            std::process::id(),
            upload_serial()
        ));
        let mut f = tokio::fs::File::create(&tmp)
            .await
            .map_err(|e| Error::internal("Image upload", e))?;
        let mut total = 0u64;
        let result: Result<(), Error> = async {
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| {
                    Error::new(
                        ErrorCode::BadBody,
                        format!("Reading the upload: {}", e.into()),
                    )
                })?;
                if let Ok(data) = frame.into_data() {
                    total += data.len() as u64;
                    if total > IMAGE_LIMIT {
                        return Err(Error::new(
                            ErrorCode::ImageTooLarge,
                            "Images are limited to 16 GiB",
                        ));
                    }
                    f.write_all(&data)
                        .await
                        .map_err(|e| Error::internal("Writing the image", e))?;
                }
            }
            if total == 0 {
                return Err(Error::new(
                    ErrorCode::BodyRequired,
                    "Send the image as the request body (application/octet-stream); it was empty",
                ));
            }
            f.sync_all()
                .await
                .map_err(|e| Error::internal("Writing the image", e))?;
            tokio::fs::rename(&tmp, &dest)
                .await
                .map_err(|e| Error::internal("Saving the image", e))
        }
        .await;
        if let Err(e) = result {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
        eprintln!("agent: image {rel} uploaded ({total} bytes)");
        Ok(json_response(
            StatusCode::CREATED,
            &ImageFile {
                path: rel.to_owned(),
                size_bytes: total,
            },
        ))
    }
}

/// A number no other upload of this process uses, for its temp file's name: two uploads of one
/// image at the same moment must not write into one file.
fn upload_serial() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}
