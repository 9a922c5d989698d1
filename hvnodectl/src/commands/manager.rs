//! The manager itself: `init` (CA, client and server certificates), `ca`, and `serve`, the
//! endpoint nodes send join requests to.

use std::net::SocketAddr;

use super::{CmdError, Ctx};
use crate::serve;

impl Ctx {
    pub(super) fn init(&self, name: &str, sans: &[String]) -> Result<(), CmdError> {
        let info = self.state.init(name, sans)?;
        let fp = self.state.ca_fingerprint()?;
        let json = serde_json::json!({
            "name": info.name,
            "state_dir": self.state.root(),
            "ca_fingerprint": fp,
            "ca_pem_path": self.state.ca_cert_path(),
        });
        self.show(&json, || {
            format!(
                "created manager {:?} in {}\nCA fingerprint: {fp}\nserver names: {}",
                info.name,
                self.state.root().display(),
                info.server_names.join(", ")
            )
        })
    }

    pub(super) fn ca(&self) -> Result<(), CmdError> {
        let info = self.state.manager()?;
        let fp = self.state.ca_fingerprint()?;
        let json = serde_json::json!({
            "name": info.name,
            "ca_fingerprint": fp,
            "ca_pem_path": self.state.ca_cert_path(),
        });
        self.show(&json, || {
            format!(
                "manager: {}\nCA fingerprint: {fp}\nCA certificate: {}",
                info.name,
                self.state.ca_cert_path().display()
            )
        })
    }

    pub(super) async fn serve(&self, listen: SocketAddr, sans: &[String]) -> Result<(), CmdError> {
        self.state.manager()?;
        if self.state.ensure_server_names(sans)? {
            eprintln!("server certificate re-issued with names {sans:?}");
        }
        Ok(serve::run(self.state.clone(), listen).await?)
    }
}
