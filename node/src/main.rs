//! `constellationd`: the daemon (`run`) and its CLI (every other subcommand).

use std::process::ExitCode;

use clap::Parser;
use node::config::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse(); // exits 2 with a one-line message on bad usage
    match cli.cmd {
        Command::Run(args) => {
            node::daemon::init_tracing();
            node::daemon::main(*args)
        }
        Command::Keygen => {
            println!("{}", proto::secure::Key::generate().to_base64());
            ExitCode::SUCCESS
        }
        other => node::cli::main(other),
    }
}
