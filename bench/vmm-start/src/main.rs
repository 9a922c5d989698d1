//! Benchmark: vmm-start

fn main() {}
