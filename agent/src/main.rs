//! hvnode-agent

fn main() {}
