//! The `vigil` binary: parse the command line, install logging, dispatch. No logic here.

use std::process::ExitCode;

use clap::Parser;

/// mimalloc, not glibc's malloc: at 10,000 nodes the appliance makes a few hundred thousand
/// small allocations a second across its threads (requests, JSON, verdicts), and the scale
/// benchmark's profile showed a quarter of the poller threads' time in glibc's `_int_malloc` and
/// `malloc_consolidate`, and a resident size that kept freed memory in per-thread arenas.
/// The `system-allocator` feature builds with glibc's malloc instead, for heap profilers that
/// hook malloc (heaptrack: `cargo build --release --features system-allocator`).
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = vigil::cli::Cli::parse();
    vigil::telemetry::init(cli.log_format);
    match vigil::cli::run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // `{:#}` prints the whole cause chain on one line, once.
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
