//! hvnode-console

fn main() {}
