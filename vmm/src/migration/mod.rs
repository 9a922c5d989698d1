//! Live migration: the guest moves to another VMM while it runs.
//!
//! - [`protocol`]: the frames of the stream between the two VMMs, bounded and checked.
//! - [`send`]: the source: pre-copy over dirty memory, the convergence rule, the switchover.
//! - [`receive`]: the destination: memory and state in, refusals out.
//!
//! The VMMs never talk TLS or TCP themselves: the source's stream is its control connection
//! after a `migrate_send` request, the destination's the one connection it accepts on its
//! `--incoming` socket, and the agents relay between them (over mutual TLS from node to node).

pub mod protocol;
pub mod receive;
pub mod send;
