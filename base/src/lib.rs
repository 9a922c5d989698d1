//! Small platform helpers shared by every hvnode process (init, the network code, the agent,
//! `hvnodectl`). std only: init links it without an async runtime.
#![forbid(unsafe_code)]

pub mod fs;
pub mod testing;
