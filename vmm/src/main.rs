//! hvnode-vmm

fn main() {}
