//! The `commons` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

use crate::identity;
use crate::settings::{self, Overrides, Settings};

/// Commons: pool your CPUs and GPUs into a peer-to-peer network for AI that no
/// single provider can switch off.
#[derive(Debug, Parser)]
#[command(name = "commons", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct GlobalArgs {
    /// Settings file (TOML). Default: config.toml in the platform config directory.
    #[arg(long, global = true, env = settings::ENV_CONFIG, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Directory for the node's key, caches and state.
    #[arg(long, global = true, env = settings::ENV_DATA_DIR, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Log filter (tracing directives, e.g. `info,commons_node=debug`); RUST_LOG also works.
    #[arg(long, global = true, env = settings::ENV_LOG, value_name = "FILTER")]
    log: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Manage the node's identity key.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Join the swarm, show a running node's status, leave.
    #[command(subcommand)]
    Node(crate::join::NodeCommand),
    /// Submit, follow and cancel jobs on the swarm.
    #[command(subcommand)]
    Job(crate::job_cli::JobCommand),
    /// Start a local swarm, split the model over it, answer a prompt, and shut it down.
    Demo(crate::demo::DemoArgs),
    /// Generate text with a model on this machine alone (the single-node baseline).
    Run(crate::run_local::RunArgs),
    /// Found coalitions, change their members, sign and show their charters.
    #[command(subcommand)]
    Coalition(crate::coalition::CoalitionCommand),
    /// Train models over the swarm.
    #[command(subcommand)]
    Train(crate::train_cli::TrainCommand),
    /// Simulate a swarm under churn, driving the real coordinator.
    #[command(subcommand)]
    Sim(crate::sim_cli::SimCommand),
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Create a new identity key (0600 permissions).
    Generate {
        /// Where to write it. Default: node.key in the data directory.
        #[arg(long, value_name = "PATH")]
        out: Option<PathBuf>,
        /// Replace an existing key file (the node gets a new identity).
        #[arg(long)]
        force: bool,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the PeerId and public key of a key file.
    Show {
        /// The key file. Default: node.key in the data directory.
        #[arg(long, env = settings::ENV_KEY, value_name = "PATH")]
        key: Option<PathBuf>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Parses the command line and runs it.
pub fn run() -> anyhow::Result<ExitCode> {
    let mut cli = Cli::parse();
    // `commons train submit --config FILE` names the training run's
    // configuration, not the node's settings.
    let run_config = match &cli.command {
        Command::Train(_) => cli.global.config.take(),
        _ => None,
    };
    let key_override = match &cli.command {
        Command::Keys(KeysCommand::Show { key, .. }) => key.clone(),
        Command::Keys(KeysCommand::Generate { out, .. }) => out.clone(),
        _ => None,
    };
    let overrides = Overrides {
        config: cli.global.config.clone(),
        data_dir: cli.global.data_dir.clone(),
        key: key_override,
        log: cli.global.log.clone(),
    };
    let settings = Settings::resolve(&overrides)?;
    init_tracing(&settings.log);
    tracing::debug!(?settings, "settings resolved");

    match cli.command {
        Command::Keys(KeysCommand::Generate { force, json, .. }) => {
            keys_generate(&settings, force, json)
        }
        Command::Keys(KeysCommand::Show { json, .. }) => keys_show(&settings, json),
        Command::Node(command) => crate::join::run(&settings, command),
        Command::Job(command) => crate::job_cli::run(&settings, command),
        Command::Run(args) => crate::run_local::run(args),
        Command::Demo(args) => crate::demo::run(args),
        Command::Coalition(command) => crate::coalition::run(&settings, command),
        Command::Train(command) => crate::train_cli::run(&settings, run_config, command),
        Command::Sim(command) => crate::sim_cli::run_command(command),
    }
}

fn init_tracing(default_filter: &str) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    use std::io::IsTerminal as _;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

fn print_identity(identity: &commons_protocol::Identity, path: &std::path::Path, json: bool) {
    let id = identity.node_id();
    if json {
        let value = serde_json::json!({ "peer_id": id.to_string(), "public_key": id.to_hex(), "key_file": path });
        println!("{value}");
    } else {
        println!("peer id:    {id}");
        println!("public key: {}", id.to_hex());
        println!("key file:   {}", path.display());
    }
}

fn keys_generate(settings: &Settings, force: bool, json: bool) -> anyhow::Result<ExitCode> {
    let identity =
        identity::generate().map_err(|e| anyhow::anyhow!("no randomness for a new key: {e}"))?;
    identity::store(&identity, &settings.key, force)?;
    tracing::info!(peer_id = %identity.node_id(), path = %settings.key.display(), "generated key");
    print_identity(&identity, &settings.key, json);
    Ok(ExitCode::SUCCESS)
}

fn keys_show(settings: &Settings, json: bool) -> anyhow::Result<ExitCode> {
    let identity = identity::load(&settings.key)
        .with_context(|| "cannot show the key (create one with `commons keys generate`)")?;
    print_identity(&identity, &settings.key, json);
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
