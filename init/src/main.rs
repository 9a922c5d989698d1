//! hvnode-init

fn main() {}
