//! `commons node join | status | leave`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use libp2p::Multiaddr;
use tokio::sync::{Notify, mpsc};

use commons_coordinator::quota::RateLimit;

use crate::network::{EventLoop, NetworkConfig};
use crate::settings::Settings;

/// Default control API address.
pub const DEFAULT_CONTROL: &str = "127.0.0.1:7717";

/// `commons node …`.
// Parsed once per process: the size of `Join` costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Join the swarm and serve until stopped (Ctrl-C, SIGTERM or `commons node leave`).
    Join(JoinArgs),
    /// Show a running node's id, addresses, peers and counters.
    Status(ControlArgs),
    /// Ask a running node to announce its leave and stop.
    Leave(ControlArgs),
    /// Serve a coalition from now on, without a restart: a charter file
    /// (taken and passed on to the swarm) or a coalition id (its charter
    /// comes from the swarm).
    Serve(CoalitionArgs),
    /// Stop serving a coalition at once: its units and jobs are refused
    /// from now on, and the node's adverts no longer list it.
    Drop(CoalitionArgs),
}

/// A coalition to serve or drop, and where to reach the node.
#[derive(Debug, Args)]
pub struct CoalitionArgs {
    /// A coalition id (64 hex digits) or a charter file.
    #[arg(value_name = "ID|CHARTER")]
    pub coalition: String,
    #[command(flatten)]
    pub control: ControlArgs,
}

/// Arguments of `commons node join`.
#[derive(Debug, Args)]
pub struct JoinArgs {
    /// Address to listen on (repeatable). Default: TCP and QUIC on port 4001, all interfaces.
    #[arg(long, value_name = "MULTIADDR")]
    pub listen: Vec<Multiaddr>,
    /// Peer to join through (repeatable).
    #[arg(long, value_name = "MULTIADDR")]
    pub bootstrap: Vec<Multiaddr>,
    /// Control API address (loopback only).
    #[arg(long, default_value = DEFAULT_CONTROL, value_name = "ADDR")]
    pub control: SocketAddr,
    /// Do not discover peers on the local network with mDNS.
    #[arg(long)]
    pub no_mdns: bool,
    /// Seconds an advert stays valid; it is republished every third of that.
    #[arg(long, default_value_t = 30, value_name = "SECS")]
    pub advert_ttl: u64,
    /// Measure the machine again instead of using the cached figures.
    #[arg(long)]
    pub rebench: bool,
    /// Model to serve: a GGUF file or Hugging Face folder, or a model id (64
    /// hex digits) to fetch from peers that hold it, verified block by block
    /// (kept in `models/` of the data directory; an interrupted fetch resumes).
    /// With `--coordinator`, the model file to plan jobs for (served too only
    /// when `--layers` is given).
    #[arg(long, value_name = "PATH|ID")]
    pub model: Option<String>,
    /// Also act as a coordinator: accept jobs, route them over the swarm, fail over.
    #[arg(long, requires = "model")]
    pub coordinator: bool,
    /// With `--coordinator`: steps of a job's chain in flight at once. 0
    /// sends each hop its unit with its input, one after another, through
    /// the coordinator; 1 sends a step to every hop at once, each hop
    /// forwarding its output to the next; 2 (the default) sends the next
    /// step too, the last hop handing a greedy job's token straight to the
    /// first. Every result still comes back to the coordinator, which checks
    /// that each ran on the one before.
    #[arg(long, default_value_t = 2, value_name = "N", requires = "coordinator",
          value_parser = clap::value_parser!(u8).range(0..=2))]
    pub stream_depth: u8,
    /// Serve the OpenAI-compatible API here (loopback only; needs `--coordinator`).
    #[arg(long, value_name = "ADDR", requires = "coordinator")]
    pub api: Option<SocketAddr>,
    /// Layers of the model to serve, e.g. `0..10` (default: all, unless
    /// coordinating), or `auto`: listen to the swarm's adverts for a few
    /// seconds, take the weakest span this node can hold, and move into a span
    /// left without a server when one is.
    #[arg(long, value_name = "A..B|auto", requires = "model")]
    pub layers: Option<String>,
    /// With `--layers auto`: the most layers this node holds.
    #[arg(long, value_name = "N")]
    pub max_layers: Option<u32>,
    /// With `--layers auto`: seconds between checks for a span without a server.
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    pub rebalance_secs: u64,
    /// Serve this coalition (repeatable): a charter file from `commons
    /// coalition create`, signed by its admins, or a coalition id whose
    /// charter comes from the swarm. The node then runs only units of the
    /// coalitions it serves, issued by their members, and a coordinator
    /// accepts only their members' jobs. Without it: open work only. Newer
    /// versions of a served charter reach the node through the swarm; `commons
    /// node serve | drop` change what it serves while it runs.
    #[arg(long, value_name = "CHARTER|ID")]
    pub coalition: Vec<String>,
    /// Work units this node runs per issuer and minute, sustained (0: no limit).
    #[arg(long, default_value_t = 120_000, value_name = "N")]
    pub issuer_units_per_min: u32,
    /// Work units one issuer may send at once.
    #[arg(long, default_value_t = 2_000, value_name = "N")]
    pub issuer_units_burst: u32,
    /// With `--coordinator`: jobs a member may submit per minute, sustained (0: no limit).
    #[arg(long, default_value_t = 60, value_name = "N")]
    pub member_jobs_per_min: u32,
    /// With `--coordinator`: jobs a member may submit at once.
    #[arg(long, default_value_t = 8, value_name = "N")]
    pub member_jobs_burst: u32,
    /// Run gradient work units of training runs (`commons train submit`):
    /// the node says so in its adverts, fetches each unit's parameters and
    /// data from the unit's issuer, verified block by block, and computes on
    /// its own thread. Needs no model.
    #[arg(long)]
    pub train: bool,
    /// Test builds only: hold every gradient unit back this many
    /// milliseconds before computing it (a slow node).
    #[cfg(feature = "fault")]
    #[arg(long, value_name = "MS", requires = "train")]
    pub train_delay_ms: Option<u64>,
    /// Test builds only: corrupt each result with probability F
    /// (`corrupt:F[:SEED]`), or each output forwarded to the next hop while
    /// returning the true one (`equivocate:F[:SEED]`).
    #[cfg(feature = "fault")]
    #[arg(long, value_name = "corrupt|equivocate:F[:SEED]")]
    pub fault: Option<crate::fault::Fault>,
}

/// Where to reach a running node.
#[derive(Debug, Args)]
pub struct ControlArgs {
    /// Its control API. Default: the address the node in the data directory recorded.
    #[arg(long, value_name = "ADDR")]
    pub control: Option<SocketAddr>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `commons node …`.
pub fn run(settings: &Settings, command: NodeCommand) -> anyhow::Result<ExitCode> {
    match command {
        NodeCommand::Join(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(join(settings, args))
        }
        NodeCommand::Status(args) => status(settings, &args),
        NodeCommand::Leave(args) => {
            let addr = control_addr(settings, args.control)?;
            crate::control::request_leave(addr)?;
            println!("asked the node at {addr} to leave");
            Ok(ExitCode::SUCCESS)
        }
        NodeCommand::Serve(args) => change_coalition(settings, &args, true),
        NodeCommand::Drop(args) => change_coalition(settings, &args, false),
    }
}

fn change_coalition(
    settings: &Settings,
    args: &CoalitionArgs,
    serve: bool,
) -> anyhow::Result<ExitCode> {
    let addr = control_addr(settings, args.control.control)?;
    let path = std::path::Path::new(&args.coalition);
    let id = crate::coalition::resolve_id(&args.coalition)?;
    // A charter file: the node takes it (and passes it on) before serving it.
    if serve && path.exists() {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        crate::control::post_to(addr, "/v1/charters", &bytes)?;
    }
    let action = if serve { "serve" } else { "drop" };
    let answer = crate::control::post_to(addr, &format!("/v1/coalitions/{id}/{action}"), &[])?;
    if args.control.json {
        println!("{answer}");
        return Ok(ExitCode::SUCCESS);
    }
    let name = answer["name"].as_str().unwrap_or("(charter pending)");
    if serve {
        println!("serving coalition {name} {id}");
        if answer["pending"] == true {
            println!("its charter has not reached the node yet: its work is refused until it does");
        }
    } else {
        println!("no longer serving coalition {name} {id}");
    }
    Ok(ExitCode::SUCCESS)
}

/// The control address: `given`, or the one the node in the data directory
/// recorded, or the default.
pub fn control_addr(settings: &Settings, given: Option<SocketAddr>) -> anyhow::Result<SocketAddr> {
    if let Some(a) = given {
        return Ok(a);
    }
    let recorded = settings.data_dir.join("control.addr");
    match std::fs::read_to_string(&recorded) {
        Ok(text) => text
            .trim()
            .parse()
            .with_context(|| format!("{} does not hold an address", recorded.display())),
        Err(_) => Ok(DEFAULT_CONTROL.parse()?),
    }
}

fn status(settings: &Settings, args: &ControlArgs) -> anyhow::Result<ExitCode> {
    let addr = control_addr(settings, args.control)?;
    let s = crate::control::fetch_status(addr)?;
    if args.json {
        println!("{s}");
        return Ok(ExitCode::SUCCESS);
    }
    println!("peer id:  {}", s["peer_id"].as_str().unwrap_or("?"));
    for a in s["listen_addrs"].as_array().into_iter().flatten() {
        println!("listen:   {}", a.as_str().unwrap_or("?"));
    }
    println!(
        "connected peers: {}   work in progress: {}",
        s["connected_peers"], s["work_in_progress"]
    );
    let peers = s["peers"].as_array().cloned().unwrap_or_default();
    println!("peers ({}):", peers.len());
    for p in peers {
        println!(
            "  {}  {} cores  {:.1} GiB  {} MFLOP/s  seen {} ms ago",
            p["peer_id"].as_str().unwrap_or("?"),
            p["cpu_cores"],
            p["ram_bytes"].as_f64().unwrap_or(0.0) / (1u64 << 30) as f64,
            p["matmul_mflops"],
            p["last_seen_ms"]
        );
    }
    let coalitions = s["coalitions"].as_array().cloned().unwrap_or_default();
    if coalitions.is_empty() {
        println!("coalitions: none (open work only)");
    }
    for c in coalitions {
        if c["pending"] == true {
            println!(
                "coalition: {} (charter not received yet)",
                c["id"].as_str().unwrap_or("?")
            );
            continue;
        }
        println!(
            "coalition: {} {} (version {}, {} members)",
            c["name"].as_str().unwrap_or("?"),
            c["id"].as_str().unwrap_or("?"),
            c["version"],
            c["members"]
        );
    }
    println!("counters: {}", s["counters"]);
    Ok(ExitCode::SUCCESS)
}

async fn shutdown_signal(leave: Arc<Notify>) {
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::terminate(),
        ) {
            Ok(s) => s,
            Err(_) => {
                tokio::select! { _ = tokio::signal::ctrl_c() => {}, () = leave.notified() => {} }
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
            () = leave.notified() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::select! { _ = tokio::signal::ctrl_c() => {}, () = leave.notified() => {} }
}

async fn join(settings: &Settings, args: JoinArgs) -> anyhow::Result<ExitCode> {
    crate::control::check_loopback(&args.control)?;
    #[cfg(feature = "fault")]
    if let Some(fault) = args.fault {
        tracing::warn!(?fault, "this node corrupts results on purpose (--fault)");
        crate::fault::install(fault);
    }
    std::fs::create_dir_all(&settings.data_dir).with_context(|| {
        format!(
            "cannot use the data directory {}",
            settings.data_dir.display()
        )
    })?;
    // Charters heard of before, so a restart never falls back to an older
    // membership than the newest this node has seen.
    let mut charters = crate::coalition::Charters::load(&settings.data_dir.join("charters"))?;
    for arg in &args.coalition {
        charters.serve_arg(arg)?;
    }
    let trust = crate::network::Trust {
        charters,
        units_per_issuer: RateLimit::new(args.issuer_units_burst, args.issuer_units_per_min),
        jobs_per_member: RateLimit::new(args.member_jobs_burst, args.member_jobs_per_min),
    };
    // The API's jobs run for the coalition, when the node serves exactly one.
    let api_coalition = match trust
        .charters
        .coalitions()
        .ids()
        .into_iter()
        .collect::<Vec<_>>()[..]
    {
        [one] => Some(one),
        _ => None,
    };
    let (identity, created) = crate::identity::load_or_create(&settings.key)?;
    if created {
        tracing::info!(path = %settings.key.display(), "created a new node key");
    }
    let identity = Arc::new(identity);
    let capacity = crate::capacity::measure(&settings.data_dir, args.rebench)?;
    let listen = if args.listen.is_empty() {
        vec![
            "/ip4/0.0.0.0/tcp/4001".parse()?,
            "/ip4/0.0.0.0/udp/4001/quic-v1".parse()?,
        ]
    } else {
        args.listen.clone()
    };
    if args.advert_ttl < 3 {
        anyhow::bail!("--advert-ttl must be at least 3 seconds");
    }
    let config = NetworkConfig {
        listen,
        bootstrap: args.bootstrap.clone(),
        mdns: !args.no_mdns,
        advert_ttl: Duration::from_secs(args.advert_ttl),
    };
    let source = args
        .model
        .as_deref()
        .map(|m| resolve_model(m, &settings.data_dir))
        .transpose()?;
    let auto = args.layers.as_deref() == Some("auto");
    let rebalance = Duration::from_secs(args.rebalance_secs.max(1));
    let serve_layers = (!args.coordinator || args.layers.is_some()) && !auto;
    let mut auto_place = None;
    let (served, shares, fetch) = match &source {
        Some(ModelSource::File(path)) => {
            if auto {
                auto_place = Some(crate::network::AutoPlace::for_file(
                    path,
                    args.max_layers,
                    rebalance,
                )?);
            }
            let served = if serve_layers {
                Some(load_served(path, args.layers.as_deref())?)
            } else {
                None
            };
            let id = crate::executor::model_id(path)?;
            // A single file can be shared with peers that lack it.
            let shares = if path.is_file() {
                vec![(id, path.clone())]
            } else {
                Vec::new()
            };
            (served, shares, None)
        }
        Some(ModelSource::Fetch { id, dest }) => {
            if args.coordinator {
                anyhow::bail!(
                    "a coordinator needs the model file itself; fetch it first with `commons node join --model {id} --layers A..B`, then pass its path"
                );
            }
            let plan = crate::network::FetchPlan {
                model: *id,
                dest: dest.clone(),
                layers: args.layers.clone(),
                max_layers: args.max_layers,
                rebalance,
            };
            (None, Vec::new(), Some(plan))
        }
        None => (None, Vec::new(), None),
    };
    let mut api_models = Vec::new();
    let coordinating = match (&source, args.coordinator) {
        (Some(ModelSource::File(path)), true) => {
            let model = crate::coordinate::KnownModel::open(path)?;
            api_models.push(crate::openai::ApiModel {
                id: model.id,
                name: path.file_stem().map_or_else(
                    || model.id.to_string(),
                    |s| s.to_string_lossy().into_owned(),
                ),
            });
            let store = crate::jobstore::JobStore::open(&settings.data_dir.join("jobs.redb"))?;
            tracing::info!(model = %model.id, "coordinating jobs");
            Some((vec![model], Some(store)))
        }
        _ => None,
    };
    let trainer = if args.train {
        #[cfg(feature = "fault")]
        let delay = Duration::from_millis(args.train_delay_ms.unwrap_or(0));
        #[cfg(not(feature = "fault"))]
        let delay = Duration::ZERO;
        tracing::info!("running gradient work units");
        Some(crate::train_exec::Trainer::spawn(delay).context("cannot start the trainer")?)
    } else {
        None
    };
    let (commands_tx, commands_rx) = mpsc::channel(64);
    let leave = Arc::new(Notify::new());
    let event_loop = EventLoop::new(
        identity.clone(),
        capacity,
        config,
        commands_rx,
        served,
        coordinating,
    )?
    .with_files(shares, fetch)?
    .with_auto_placement(auto_place)
    .with_trainer(trainer)
    .with_trust(trust)
    .with_stream_depth(usize::from(args.stream_depth));

    let stopping = Arc::new(Notify::new());
    let server_stop = {
        let s = stopping.clone();
        async move { s.notified().await }
    };
    let api = match args.api {
        Some(addr) => {
            let stop = {
                let s = stopping.clone();
                async move { s.notified().await }
            };
            let (bound, server) = crate::openai::serve(
                addr,
                commands_tx.clone(),
                identity.clone(),
                api_models,
                api_coalition,
                stop,
            )
            .await?;
            println!(
                "{}",
                serde_json::json!({ "event": "api", "address": bound.to_string() })
            );
            Some(tokio::spawn(server))
        }
        None => None,
    };
    let (control, server) =
        crate::control::serve(args.control, commands_tx, leave.clone(), server_stop).await?;
    std::fs::write(settings.data_dir.join("control.addr"), control.to_string())?;
    println!(
        "{}",
        serde_json::json!({ "event": "joined", "peer_id": identity.node_id().to_string(), "control": control.to_string() })
    );
    let server = tokio::spawn(server);
    event_loop.run(shutdown_signal(leave)).await;
    stopping.notify_waiters();
    stopping.notify_one();
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    if let Some(api) = api {
        let _ = tokio::time::timeout(Duration::from_secs(5), api).await;
    }
    let _ = std::fs::remove_file(settings.data_dir.join("control.addr"));
    println!("{}", serde_json::json!({ "event": "left" }));
    Ok(ExitCode::SUCCESS)
}

/// Where a node's model comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A file or folder on this machine.
    File(PathBuf),
    /// Peers, by id; the verified file goes to `dest`.
    Fetch {
        /// The file's blake3.
        id: commons_protocol::ModelId,
        /// Where it will be kept.
        dest: PathBuf,
    },
}

/// Reads `--model`: an existing path, or a model id (already fetched into
/// `data_dir/models/`, or to fetch).
pub fn resolve_model(arg: &str, data_dir: &std::path::Path) -> anyhow::Result<ModelSource> {
    let path = PathBuf::from(arg);
    if path.exists() {
        // A training checkpoint is served as the model folder it exports to.
        return Ok(ModelSource::File(crate::train_export::resolve(&path)?));
    }
    let id: commons_protocol::Hash = arg.parse().map_err(|_| {
        anyhow::anyhow!("--model {arg}: no such file, and not a model id (64 hex digits) either")
    })?;
    let id = commons_protocol::ModelId(id);
    let dest = data_dir.join("models").join(format!("{id}.gguf"));
    if dest.is_file() {
        let actual = crate::executor::model_id(&dest)?;
        anyhow::ensure!(
            actual == id,
            "{} should hold model {id} but hashes to {actual}; delete it to fetch it again",
            dest.display()
        );
        return Ok(ModelSource::File(dest));
    }
    Ok(ModelSource::Fetch { id, dest })
}

/// Loads the served layer range and starts its engine.
pub(crate) fn load_served(
    path: &std::path::Path,
    layers: Option<&str>,
) -> anyhow::Result<crate::executor::serve::Served> {
    use crate::executor::{ModelFile, Stage, engine, model_id};
    let model = ModelFile::open(path)?;
    let n_layer = model.config().n_layer;
    let range = match layers {
        None => 0..n_layer,
        Some(text) => {
            let split = crate::run_local::parse_ranges(text)
                .map_err(|e| anyhow::anyhow!("--layers: {e}"))?;
            match split.0.as_slice() {
                [one] => one.clone(),
                _ => anyhow::bail!("--layers takes one range A..B"),
            }
        }
    };
    let stage = Stage::load(&model, range.clone(), &candle_core::Device::Cpu)?;
    let hidden = stage.config().hidden;
    let (engine, _thread) = engine::spawn(stage, engine::EngineConfig::default())?;
    let id = model_id(path)?;
    tracing::info!(model = %id, layers = ?range, "serving");
    Ok(crate::executor::serve::Served {
        model: id,
        layers: commons_protocol::messages::LayerRange {
            start: range.start as u32,
            end: range.end as u32,
        },
        total_layers: n_layer as u32,
        hidden,
        engine,
    })
}
