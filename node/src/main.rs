//! `shoal`: the Shoal node agent (`shoal daemon`) and its command-line client.
//!
//! The daemon joins this host to a swarm (Raft store over QUIC with mutual
//! TLS); every other command talks to the local daemon over its Unix socket.

mod api;
mod cli;
mod daemon;
mod views;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse_args();
    // A task shim (one per task) needs no worker threads.
    let mut builder = if cli.is_shim() {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("Error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli.exec()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => match e.downcast_ref::<cli::exec::ExitStatus>() {
            Some(cli::exec::ExitStatus(code)) => std::process::ExitCode::from(*code),
            None => {
                eprintln!("Error: {e:#}");
                // The daemon's refusals exit with their kind's code.
                let kind = e.chain().find_map(|c| c.downcast_ref::<api::ApiError>());
                std::process::ExitCode::from(kind.map_or(1, |a| a.kind.exit_code()))
            }
        },
    }
}
