//! The `vigil` binary: parse the command line, install logging, dispatch. No logic here.

use std::process::ExitCode;

use clap::Parser;

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
