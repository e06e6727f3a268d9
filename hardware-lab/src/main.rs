//! vigil lab
fn main() {}
