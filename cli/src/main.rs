//! `capy`: the command-line client of capy's REST API.

mod client;
mod commands;
mod config;
mod output;
mod wait;

use std::process::ExitCode;

use clap::Parser as _;

use crate::client::Client;
use crate::commands::Ctx;
use crate::config::{Cli, UsageError};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => exit_code(&error),
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = cli.global.resolve(cli.command.key_kind())?;
    let ctx = Ctx {
        client: Client::new(&config)?,
        output: cli.global.output,
    };
    cli.command.run(&ctx).await
}

/// Prints the error; 2 for usage and configuration mistakes, 1 for everything else.
/// A closed stdout (`capy … | head`) ends quietly.
fn exit_code(error: &anyhow::Error) -> ExitCode {
    let broken_pipe = error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    });
    if broken_pipe {
        return ExitCode::SUCCESS;
    }
    eprintln!("error: {error:#}");
    if error.downcast_ref::<UsageError>().is_some() {
        ExitCode::from(2)
    } else {
        ExitCode::FAILURE
    }
}
