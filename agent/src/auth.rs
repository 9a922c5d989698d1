//! Who may call what. The local socket (root on the node) may do everything. Over TCP, before
//! registration only `GET` and `POST /v1/registration` answer; afterwards every route needs a
//! client certificate verified against the registered manager's CA under the current
//! registration generation, so that unregistering cuts off connections made before it. The
//! console's routes ([`Route::local_only`]) do not exist over TCP. A certificate the manager
//! signed for a node (another node of this manager) opens the node-to-node routes
//! ([`Route::node_to_node`], the destination's half of a migration) and nothing else; the
//! manager's certificate opens everything but those.

use hvnode_api::error::ErrorCode;
use hvnode_api::routes::{method, Route};

use crate::error::Error;
use crate::{Agent, Origin};

impl Agent {
    /// Checks a request before it is routed; `route` is `None` for a path that is no route.
    pub(crate) fn authorize(
        &self,
        origin: Origin,
        method: &str,
        route: Option<&Route>,
    ) -> Result<(), Error> {
        let Origin::Tcp {
            client_generation,
            node_peer,
        } = origin
        else {
            return Ok(());
        };
        match route {
            Some(Route::Registration) if method == method::GET || method == method::POST => {
                return Ok(())
            }
            Some(r) if r.local_only() => return Err(Error::not_found()),
            _ => {}
        }
        let current = self.registration.generation();
        match client_generation {
            _ if !self.registration.is_registered() => Err(Error::new(
                ErrorCode::NotRegistered,
                "The node is not registered with a manager: register it first (POST /v1/registration with the pairing code shown on its console)",
            )),
            None => Err(Error::new(
                ErrorCode::ClientCertificateRequired,
                "Present a client certificate signed by the registered manager's CA",
            )),
            Some(g) if g != current => Err(Error::new(
                ErrorCode::UntrustedClientCertificate,
                "The client certificate is not signed by the manager this node trusts now: reconnect, or re-register",
            )),
            // Another node of this manager may only hand over guests; only another node may.
            // A method the route does not serve is the router's 405 for the manager as for
            // anyone registered (the document is public; the answer reveals nothing).
            Some(_)
                if route.is_some_and(Route::node_to_node) != node_peer
                    && route.is_none_or(|r| r.methods().contains(&method)) =>
            {
                Err(Error::new(
                ErrorCode::NodeCertificateRequired,
                if node_peer {
                    "A node's certificate opens only the node-to-node routes (/v1/migrations)"
                } else {
                    "Only another node of this manager, with the certificate the manager signed \
                     for it, may call the node-to-node routes"
                    },
                ))
            }
            Some(_) => Ok(()),
        }
    }
}
