//! The data partition: what init reports about it, the blank disks it could go on, and creating
//! it on one (through init, after the admin typed the device name twice).

use std::sync::Arc;

use hvnode_api::error::ErrorCode;
use hvnode_api::init::InitRequest;
use hvnode_api::node::{StorageInit, StorageView};
use hyper::StatusCode;

use crate::error::{blocking, Error};
use crate::http::{json_response, Resp};
use crate::node::facts;
use crate::Agent;

impl Agent {
    /// `GET /v1/storage`.
    pub(crate) async fn storage(&self) -> Result<Resp, Error> {
        let run = self.paths.run.clone();
        let view = blocking("Storage", move || {
            Ok(StorageView {
                status: facts::storage_status(&run),
                blank_disks: facts::disks(true).into_iter().filter(|d| d.blank).collect(),
            })
        })
        .await?;
        Ok(json_response(StatusCode::OK, &view))
    }

    /// `POST /v1/storage/init`: creates the data partition on a blank disk, through init.
    pub(crate) async fn init_storage(self: &Arc<Self>, req: StorageInit) -> Result<Resp, Error> {
        if req.device != req.confirm {
            return Err(Error::new(
                ErrorCode::ConfirmationMismatch,
                "Type the device name again in `confirm` exactly as in `device`",
            ));
        }
        let me = Arc::clone(self);
        blocking("Storage", move || {
            me.init
                .request(&InitRequest::InitStorage { device: req.device })
        })
        .await?;
        Ok(json_response(
            StatusCode::OK,
            &StorageView {
                status: facts::storage_status(&self.paths.run),
                blank_disks: Vec::new(),
            },
        ))
    }
}
