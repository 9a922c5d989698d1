//! Small platform helpers shared by every hvnode process (init, the network code, the agent,
//! `hvnodectl`, the tests). No async runtime: init links it. Only [`spawn`] holds `unsafe`.
#![deny(unsafe_code)]

pub mod cgroup;
pub mod fs;
#[allow(unsafe_code)]
pub mod spawn;
pub mod testing;
