//! `constellationd`: the daemon (`run`) and its CLI (every other subcommand).

use std::process::ExitCode;

use node::config::Command;
use node::configfile::{self, LoadError};

fn main() -> ExitCode {
    // Flags, environment and the `--config` file, before anything binds:
    // bad usage exits 2 with a one-line message.
    let loaded = match configfile::load(std::env::args_os()) {
        Ok(l) => l,
        Err(LoadError::Clap(e)) => e.exit(),
        Err(LoadError::File(line)) => {
            eprintln!("{line}");
            return ExitCode::from(2);
        }
    };
    match loaded.cli.cmd {
        Command::Run(args) => node::daemon::main(*args, loaded.source),
        Command::Keygen => {
            println!("{}", proto::secure::Key::generate().to_base64());
            ExitCode::SUCCESS
        }
        other => node::cli::main(other),
    }
}
