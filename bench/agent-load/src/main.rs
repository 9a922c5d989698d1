//! Benchmark: agent-load

fn main() {}
