//! `commons demo`: a whole swarm on this machine. Starts a coordinator and
//! several node processes on loopback, places the model's layers over the
//! nodes, generates an answer through them as a signed job, prints who
//! served what, the speed and the receipts, then has every process leave.
//!
//! `commons demo --train CONFIG` does the same for training: it starts
//! training nodes (`commons node join --train`), runs `commons train submit`
//! over them, then samples from the trained model with `commons run`.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Args;
use commons_coordinator::placement::{self, ModelShape, NodeCapacity};
use commons_protocol::NodeId;
use commons_protocol::messages::{JobInput, JobSpec, JobState, SamplingParams};

use crate::job_cli::{JobClient, new_job_id, print_summary};

/// Arguments of `commons demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// The prompt (a user message, through the model's chat template).
    #[arg(
        long,
        default_value = DEFAULT_PROMPT,
        value_name = "TEXT"
    )]
    pub prompt: String,
    /// Node processes to split the model over.
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub nodes: usize,
    /// Model file. Default: the bundled SmolLM2-135M-Instruct (fetched if missing).
    #[arg(long, env = crate::run_local::ENV_MODEL, default_value = crate::run_local::DEFAULT_MODEL, value_name = "PATH")]
    pub model: PathBuf,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub max_tokens: u32,
    /// Send the prompt as it is, without the chat template.
    #[arg(long)]
    pub raw: bool,
    /// Train instead: run the training run configured by this TOML file
    /// (see `train/configs/`) over `--nodes` training nodes, then sample
    /// `--max-tokens` characters from the result, continuing `--prompt`
    /// (default `ROMEO:`) at temperature 0.8.
    #[arg(long, value_name = "CONFIG")]
    pub train: Option<PathBuf>,
    /// With `--train`: where the run's files go (default `train-out`).
    #[arg(long, value_name = "DIR", requires = "train")]
    pub out: Option<PathBuf>,
}

/// The default prompt, which a training demo replaces with its own.
const DEFAULT_PROMPT: &str = "What is the capital of France?";

/// A child `commons node join` process; asked to leave, then killed, when dropped.
struct Proc {
    name: String,
    child: Child,
    control: SocketAddr,
    address: String,
}

impl Proc {
    fn start(name: &str, data_dir: &Path, args: &[String]) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("cannot find the commons executable")?;
        let mut child = Command::new(exe)
            .arg("--data-dir")
            .arg(data_dir)
            .args([
                "node",
                "join",
                "--no-mdns",
                "--control",
                "127.0.0.1:0",
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
            ])
            .args(args)
            .env("COMMONS_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            // Read to the end even once nobody listens: a closed pipe would
            // make the node's last lines fail.
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    let _ = tx.send(v);
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let (mut control, mut address) = (None, None);
        while control.is_none() || address.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(v) = rx.recv_timeout(left) else {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{name} did not start within 60 s");
            };
            match v["event"].as_str() {
                Some("joined") => control = v["control"].as_str().and_then(|c| c.parse().ok()),
                Some("listening") => address = v["address"].as_str().map(str::to_owned),
                _ => {}
            }
        }
        Ok(Self {
            name: name.to_owned(),
            child,
            control: control.context("no control address")?,
            address: address.context("no listen address")?,
        })
    }

    fn leave(&mut self) {
        let _ = crate::control::request_leave(self.control);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        tracing::warn!(name = %self.name, "did not leave in time; killed");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `scripts/fetch-model.sh` when the bundled model is asked for and missing.
fn ensure_model(path: &Path) -> anyhow::Result<()> {
    if path.is_file() {
        return Ok(());
    }
    let script = Path::new("scripts/fetch-model.sh");
    if path != Path::new(crate::run_local::DEFAULT_MODEL) || !script.is_file() {
        bail!("model file {} not found (pass --model)", path.display());
    }
    eprintln!("fetching the bundled model…");
    let status = Command::new("bash").arg(script).status()?;
    if !status.success() || !path.is_file() {
        bail!("scripts/fetch-model.sh failed; the model is still missing");
    }
    Ok(())
}

/// Runs `commons demo`.
pub fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    if args.nodes == 0 || args.nodes > 32 {
        bail!("--nodes must be between 1 and 32");
    }
    if let Some(config) = &args.train {
        return run_training(&args, config);
    }
    ensure_model(&args.model)?;
    let model_path = args.model.canonicalize()?;
    let model = crate::executor::ModelFile::open(&model_path)?;
    let cfg = model.config().clone();
    let model_id = crate::executor::model_id(&model_path)?;
    drop(model);

    // Place the layers: equal nodes on one machine split the model evenly.
    let shape = ModelShape {
        n_layers: cfg.n_layer as u32,
        layer_bytes: 1,
    };
    let nodes: Vec<NodeCapacity> = (0..args.nodes)
        .map(|i| NodeCapacity {
            node: NodeId([i as u8 + 1; 32]),
            layer_throughput: 1.0,
            memory_bytes: u64::from(shape.n_layers).div_ceil(args.nodes as u64),
        })
        .collect();
    let plan = placement::plan(&shape, &nodes)?;
    let mut ranges: Vec<_> = plan.assignments.iter().map(|a| a.layers).collect();
    ranges.sort_by_key(|r| (r.start, r.end));
    // Executors load one fixed range and the chain must tile the model, so a
    // span that overlaps the one before it starts where that one ends;
    // exact replicas stay as they are.
    let mut covered = 0;
    for i in 0..ranges.len() {
        if i > 0 && ranges[i] == ranges[i - 1] {
            continue;
        }
        ranges[i].start = ranges[i].start.max(covered).min(ranges[i].end);
        covered = covered.max(ranges[i].end);
    }
    ranges.retain(|r| !r.is_empty());

    let home = std::env::temp_dir().join(format!("commons-demo-{}", std::process::id()));
    std::fs::create_dir_all(&home)?;
    let result = run_swarm(&args, &home, &model_path, model_id, &ranges);
    let _ = std::fs::remove_dir_all(&home);
    result
}

fn run_swarm(
    args: &DemoArgs,
    home: &Path,
    model_path: &Path,
    model_id: commons_protocol::ModelId,
    ranges: &[commons_protocol::messages::LayerRange],
) -> anyhow::Result<ExitCode> {
    let m = model_path.to_string_lossy().into_owned();
    let started = Instant::now();
    let mut coordinator = Proc::start(
        "the coordinator",
        &home.join("coordinator"),
        &["--coordinator".into(), "--model".into(), m.clone()],
    )?;
    eprintln!("coordinator  {}", coordinator.address);
    let mut procs = Vec::new();
    for (i, r) in ranges.iter().enumerate() {
        let p = Proc::start(
            &format!("node {}", i + 1),
            &home.join(format!("node{}", i + 1)),
            &[
                "--bootstrap".into(),
                coordinator.address.clone(),
                "--model".into(),
                m.clone(),
                "--layers".into(),
                r.to_string(),
            ],
        )?;
        eprintln!("node {}       layers {r:>7}  {}", i + 1, p.address);
        procs.push(p);
    }
    // Wait until the coordinator has every node's advert.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = crate::control::fetch_status(coordinator.control)?;
        let serving = status["peers"].as_array().map_or(0, |p| {
            p.iter()
                .filter(|p| p["models"].as_array().is_some_and(|m| !m.is_empty()))
                .count()
        });
        if serving >= procs.len() {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "the coordinator saw {serving} of {} nodes within 60 s",
                procs.len()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "swarm of {} nodes ready in {:.1} s",
        procs.len(),
        started.elapsed().as_secs_f64()
    );

    let member = crate::identity::generate().map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    let spec = JobSpec {
        job: new_job_id()?,
        model: model_id,
        input: if args.raw {
            JobInput::Text(args.prompt.clone())
        } else {
            JobInput::user(args.prompt.clone())
        },
        max_tokens: args.max_tokens,
        sampling: SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
        },
        coalition: None,
    };
    eprintln!("prompt: {}", args.prompt);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let address = coordinator.address.parse()?;
    let report = runtime.block_on(async {
        let mut client = JobClient::new(member, address)?;
        let mut printed = 0;
        let mut stdout = std::io::stdout();
        let report = client
            .run(spec, Duration::from_secs(30), |r| {
                if let Some(new) = r.text.get(printed..)
                    && !new.is_empty()
                {
                    let _ = stdout
                        .write_all(new.as_bytes())
                        .and_then(|()| stdout.flush());
                    printed = r.text.len();
                }
            })
            .await?;
        println!();
        anyhow::Ok(report)
    })?;
    print_summary(&report);
    for p in procs.iter_mut() {
        p.leave();
    }
    coordinator.leave();
    Ok(match report.state {
        JobState::Stopped | JobState::Length => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    })
}

/// `commons demo --train CONFIG`.
fn run_training(args: &DemoArgs, config: &Path) -> anyhow::Result<ExitCode> {
    if !config.is_file() {
        bail!("training configuration {} not found", config.display());
    }
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("train-out"));
    let home = std::env::temp_dir().join(format!("commons-train-demo-{}", std::process::id()));
    std::fs::create_dir_all(&home)?;
    let result = train_swarm(args, config, &out, &home);
    let _ = std::fs::remove_dir_all(&home);
    result
}

fn train_swarm(
    args: &DemoArgs,
    config: &Path,
    out: &Path,
    home: &Path,
) -> anyhow::Result<ExitCode> {
    let exe = std::env::current_exe().context("cannot find the commons executable")?;
    let mut procs: Vec<Proc> = Vec::new();
    for i in 0..args.nodes {
        let mut node_args = vec!["--train".to_owned()];
        if let Some(first) = procs.first() {
            node_args.extend(["--bootstrap".to_owned(), first.address.clone()]);
        }
        let p = Proc::start(
            &format!("node {}", i + 1),
            &home.join(format!("node{}", i + 1)),
            &node_args,
        )?;
        eprintln!("training node {}  {}", i + 1, p.address);
        procs.push(p);
    }
    let bootstrap = procs
        .first()
        .map(|p| p.address.clone())
        .context("no nodes")?;
    let status = Command::new(&exe)
        .arg("--data-dir")
        .arg(home.join("submitter"))
        .arg("--config")
        .arg(config)
        .args([
            "train",
            "submit",
            "--no-mdns",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
        ])
        .arg("--out")
        .arg(out)
        .args(["--bootstrap", &bootstrap, "--min-nodes"])
        .arg(args.nodes.to_string())
        .env("COMMONS_LOG", "warn")
        .stdin(Stdio::null())
        .status()
        .context("cannot start commons train submit")?;
    for p in procs.iter_mut() {
        p.leave();
    }
    if !status.success() {
        bail!("the training run failed ({status})");
    }
    let checkpoint = out.join("final.safetensors");
    let prompt = if args.prompt == DEFAULT_PROMPT {
        "ROMEO:"
    } else {
        args.prompt.as_str()
    };
    eprintln!("\nsample from {}:", checkpoint.display());
    let status = Command::new(&exe)
        .args(["run", "--model"])
        .arg(&checkpoint)
        .args(["--prompt", prompt, "--temperature", "0.8", "--seed", "1"])
        .env("COMMONS_LOG", "warn")
        .arg("--max-tokens")
        .arg(args.max_tokens.to_string())
        .status()
        .context("cannot start commons run")?;
    Ok(if status.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
