//! hvnodectl: manage hvnode nodes from the admin's machine.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use hvnode_api::error::chain;
use hvnodectl::cli::Cli;
use hvnodectl::commands::Ctx;
use hvnodectl::state::StateDir;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let root = match cli
        .state_dir
        .clone()
        .map(Ok)
        .unwrap_or_else(StateDir::default_path)
    {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    let ctx = Ctx {
        state: StateDir::new(root),
        json: cli.json,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    match runtime.block_on(ctx.run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

/// Prints `error: <message>: <cause>: ...` and returns exit code 1.
fn fail(err: &dyn std::error::Error) -> ExitCode {
    eprintln!("error: {}", chain(err));
    ExitCode::FAILURE
}
