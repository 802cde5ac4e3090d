use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = umeme_gateway::cli::Cli::parse();
    umeme_gateway::cli::init_logging();
    umeme_gateway::cli::run(cli)
}
