//! `guest console`: the guest's serial console log, or with `--attach` the terminal joined to
//! the console through the agent's upgrade ([`crate::attach`] runs the session).

use hvnode_api::guest;
use hvnode_api::routes::{Route, CONSOLE_PROTOCOL};
use hyper::Method;

use super::{path_with, CmdError, Ctx};
use crate::attach::{self, End};
use crate::output;

impl Ctx {
    /// Prints the console log, the last `bytes` of it if given.
    pub(super) async fn console_log(
        &self,
        node: &str,
        name: &str,
        bytes: Option<u64>,
    ) -> Result<(), CmdError> {
        guest::validate_name(name)?;
        let c = self.connect(node)?;
        let path = path_with(&Route::GuestConsole(name.to_owned()), "bytes", bytes);
        let raw = c.call(Method::GET, &path, None, "").await?;
        Ok(output::verbatim(&raw)?)
    }

    /// Joins the terminal to the console until a detach, the node closing it, or a signal.
    pub(super) async fn console_attach(&self, node: &str, name: &str) -> Result<(), CmdError> {
        guest::validate_name(name)?;
        let c = self.connect(node)?;
        let conn = c
            .upgrade(
                &Route::GuestConsoleAttach(name.to_owned()).path(),
                CONSOLE_PROTOCOL,
            )
            .await?;
        let banner = format!("Connected to {name}; Ctrl-] detaches");
        match attach::run(conn, &banner).await? {
            End::Detached => eprintln!("\nDetached from {name}"),
            End::Closed => eprintln!(
                "\nThe console of {name} closed: the guest stopped or node {node} ended the connection"
            ),
            End::Signal => eprintln!("\nDetached from {name} (signal)"),
        }
        Ok(())
    }
}
