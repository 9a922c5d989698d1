//! hvnodectl

fn main() {}
