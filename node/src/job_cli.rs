//! `commons job submit | status | cancel`: a member's signed requests to a
//! coordinator, over `/commons/job/1.0.0`. Tokens stream by long polls: each
//! watch returns as soon as there are tokens the member has not seen.
//! `commons job audit` works offline on a coordinator's database
//! ([`crate::audit`]).

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use commons_protocol::envelope::{Envelope, MessageKind};
use commons_protocol::messages::{
    ErrorCode, ErrorReply, JobInput, JobOp, JobReport, JobRequest, JobSpec, JobState,
    SamplingParams,
};
use commons_protocol::{Identity, JobId, ModelId, Nonce, UnixMillis};
use futures::StreamExt as _;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, Swarm, multiaddr::Protocol, noise, tcp, yamux};

use crate::network::work::{JOB_PROTOCOL, JobCodec};
use crate::settings::Settings;

/// `commons job …`.
#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// Submit a text generation job, stream its tokens, and print its route and receipts.
    Submit(SubmitArgs),
    /// Show a job's state.
    Status(JobRef),
    /// Cancel a job you submitted.
    Cancel(JobRef),
    /// Check a job's receipts offline, in a stopped coordinator's data
    /// directory (`--data-dir`): every signature, the audit log's hash chain
    /// and the job's transcript; export the receipts as JSON lines.
    Audit(crate::audit::AuditArgs),
}

/// Which coordinator.
#[derive(Debug, Args)]
pub struct CoordinatorArg {
    /// The coordinator's address with `/p2p/<PeerId>`. Default: the node running
    /// from this data directory.
    #[arg(long, value_name = "MULTIADDR")]
    pub coordinator: Option<Multiaddr>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `commons job submit`.
#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// The model: its id (64 hex digits) or a model file to take the id of.
    #[arg(long, env = crate::run_local::ENV_MODEL, default_value = crate::run_local::DEFAULT_MODEL, value_name = "ID|PATH")]
    pub model: String,
    /// The prompt.
    #[arg(long, value_name = "TEXT")]
    pub prompt: String,
    /// Treat the prompt as a user message and apply the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128, value_name = "N")]
    pub max_tokens: u32,
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Keep only the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    pub top_k: u32,
    /// Nucleus sampling threshold.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Penalty for repeating recent tokens (1.0: none).
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// Seed for sampling.
    #[arg(long, default_value_t = 299_792_458)]
    pub seed: u64,
    /// The job's id (32 hex digits). Default: a random one. Submitting the same
    /// id again follows the job already accepted instead of starting another.
    #[arg(long, value_name = "HEX")]
    pub job_id: Option<JobId>,
    /// The coalition the job runs for: its charter file or its id (64 hex
    /// digits). Only its members may submit it and only nodes serving it run
    /// it. Default: open work.
    #[arg(long, value_name = "FILE|ID")]
    pub coalition: Option<String>,
    /// Keep the coordinator's final signed report here: it anchors the job's
    /// audit log (`commons job audit ID --report FILE`).
    #[arg(long, value_name = "FILE")]
    pub save_report: Option<PathBuf>,
    #[command(flatten)]
    pub target: CoordinatorArg,
}

/// A job and its coordinator.
#[derive(Debug, Args)]
pub struct JobRef {
    /// The job id.
    pub job: JobId,
    /// Keep the coordinator's signed report here (see `job submit --save-report`).
    #[arg(long, value_name = "FILE")]
    pub save_report: Option<PathBuf>,
    #[command(flatten)]
    pub target: CoordinatorArg,
}

/// Writes the client's last signed report to `path`, if asked.
fn save_report(client: &JobClient, path: Option<&PathBuf>) -> anyhow::Result<()> {
    let Some(path) = path else {
        return Ok(());
    };
    if client.last_report_bytes().is_empty() {
        anyhow::bail!("no report was received to save to {}", path.display());
    }
    std::fs::write(path, client.last_report_bytes())
        .with_context(|| format!("cannot write the report to {}", path.display()))
}

/// A coordinator's refusal or a broken exchange.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The coordinator refused, with a stable code.
    #[error("the coordinator refused: {message} ({code})")]
    Refused {
        /// Its code.
        code: ErrorCode,
        /// Its message.
        message: String,
    },
    /// The exchange failed.
    #[error("{0}")]
    Transport(String),
}

/// A member's connection to a coordinator.
pub struct JobClient {
    swarm: Swarm<request_response::Behaviour<JobCodec>>,
    identity: Identity,
    coordinator: PeerId,
    address: Multiaddr,
    counter: u64,
    nonce_seed: [u8; 8],
    /// The signed envelope of the last report received.
    last_report: Vec<u8>,
}

impl std::fmt::Debug for JobClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobClient")
            .field("coordinator", &self.coordinator)
            .finish_non_exhaustive()
    }
}

fn now() -> UnixMillis {
    UnixMillis(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    )
}

impl JobClient {
    /// A client signing with `identity`, talking to the coordinator at `address`
    /// (which must end in `/p2p/<PeerId>`).
    pub fn new(identity: Identity, address: Multiaddr) -> anyhow::Result<Self> {
        let Some(Protocol::P2p(coordinator)) = address.iter().last() else {
            bail!("the coordinator address {address} must end in /p2p/<PeerId>");
        };
        let swarm = libp2p::SwarmBuilder::with_existing_identity(crate::identity::libp2p_keypair(
            &identity,
        ))
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )?
        .with_quic()
        .with_behaviour(|_| {
            request_response::Behaviour::new(
                [(JOB_PROTOCOL, ProtocolSupport::Outbound)],
                request_response::Config::default().with_request_timeout(Duration::from_secs(60)),
            )
        })?
        .with_swarm_config(|c| {
            c.with_idle_connection_timeout(Duration::from_secs(60))
                .with_substream_upgrade_protocol_override(libp2p::core::upgrade::Version::V1Lazy)
        })
        .build();
        let mut seed = [0u8; 8];
        getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
        Ok(Self {
            swarm,
            identity,
            coordinator,
            address,
            counter: 0,
            nonce_seed: seed,
            last_report: Vec::new(),
        })
    }

    /// Sends `op`, signed, and waits for the report.
    pub async fn request(&mut self, op: JobOp) -> Result<JobReport, JobError> {
        self.counter += 1;
        let mut nonce = [0u8; 16];
        nonce[..8].copy_from_slice(&self.nonce_seed);
        nonce[8..].copy_from_slice(&self.counter.to_le_bytes());
        let t = now();
        let request = JobRequest {
            submitter: self.identity.node_id(),
            nonce: Nonce(nonce),
            issued_at: t,
            expires_at: t.plus_millis(120_000),
            op,
        };
        let bytes = Envelope::seal(&self.identity, &request)
            .map_err(|e| JobError::Transport(e.to_string()))?
            .to_bytes();
        if !self.swarm.is_connected(&self.coordinator) {
            self.swarm
                .dial(self.address.clone())
                .map_err(|e| JobError::Transport(format!("cannot dial {}: {e}", self.address)))?;
        }
        let id = self
            .swarm
            .behaviour_mut()
            .send_request(&self.coordinator, bytes);
        let response = tokio::time::timeout(Duration::from_secs(90), async {
            loop {
                match self.swarm.select_next_some().await {
                    SwarmEvent::Behaviour(request_response::Event::Message {
                        message:
                            request_response::Message::Response {
                                request_id,
                                response,
                            },
                        ..
                    }) if request_id == id => return Ok(response),
                    SwarmEvent::Behaviour(request_response::Event::OutboundFailure {
                        request_id,
                        error,
                        ..
                    }) if request_id == id => {
                        return Err(JobError::Transport(format!(
                            "no answer from the coordinator at {}: {error}",
                            self.address
                        )));
                    }
                    _ => {}
                }
            }
        })
        .await
        .map_err(|_| JobError::Transport("no answer from the coordinator in 90 s".into()))??;
        let envelope =
            Envelope::from_bytes(&response).map_err(|e| JobError::Transport(e.to_string()))?;
        if envelope.signer()
            != commons_protocol::NodeId::from_peer_id_bytes(&self.coordinator.to_bytes())
                .map_err(|e| JobError::Transport(e.to_string()))?
        {
            return Err(JobError::Transport(
                "the answer is not signed by the coordinator".into(),
            ));
        }
        match envelope.kind() {
            MessageKind::JobReport => {
                let report = envelope
                    .open::<JobReport>(now())
                    .map_err(|e| JobError::Transport(e.to_string()))?;
                self.last_report = response;
                Ok(report)
            }
            MessageKind::ErrorReply => {
                let e: ErrorReply = envelope
                    .open(now())
                    .map_err(|e| JobError::Transport(e.to_string()))?;
                Err(JobError::Refused {
                    code: e.code,
                    message: e.message,
                })
            }
            other => Err(JobError::Transport(format!("unexpected {other:?} answer"))),
        }
    }

    /// The signed envelope of the last report received (empty before one):
    /// evidence of what the coordinator reported, its audit log's head
    /// included, for `commons job audit --report`.
    #[must_use]
    pub fn last_report_bytes(&self) -> &[u8] {
        &self.last_report
    }

    /// Submits `spec`, then follows it to its end, calling `on_report` with
    /// every report. Survives a coordinator restart: watches are retried for
    /// up to `patience`.
    pub async fn run(
        &mut self,
        spec: JobSpec,
        patience: Duration,
        mut on_report: impl FnMut(&JobReport),
    ) -> Result<JobReport, JobError> {
        let job = spec.job;
        let started = std::time::Instant::now();
        // Submitting again is harmless: the coordinator knows the job by its id.
        let mut report = loop {
            match self.request(JobOp::Submit(spec.clone())).await {
                Ok(r) => break r,
                Err(e @ JobError::Refused { .. }) => return Err(e),
                Err(e) if started.elapsed() > patience => return Err(e),
                Err(e) => {
                    tracing::warn!(%e, "cannot submit yet; retrying");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        };
        on_report(&report);
        let mut have = report.total_tokens;
        let mut failing_since: Option<std::time::Instant> = None;
        while !report.state.is_terminal() {
            match self
                .request(JobOp::Watch {
                    job,
                    from_token: have,
                    wait_ms: 10_000,
                })
                .await
            {
                Ok(r) => {
                    failing_since = None;
                    have = r.total_tokens;
                    on_report(&r);
                    report = r;
                }
                Err(e @ JobError::Refused { .. }) => return Err(e),
                Err(e) => {
                    let since = *failing_since.get_or_insert_with(std::time::Instant::now);
                    if since.elapsed() > patience {
                        return Err(e);
                    }
                    tracing::warn!(%e, "coordinator unreachable; retrying");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
        Ok(report)
    }
}

/// Runs `commons job …`.
pub fn run(settings: &Settings, command: JobCommand) -> anyhow::Result<ExitCode> {
    if let JobCommand::Audit(args) = &command {
        return crate::audit::run(settings, args);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match command {
            JobCommand::Submit(args) => submit(settings, args).await,
            JobCommand::Status(r) => status(settings, r, false).await,
            JobCommand::Cancel(r) => status(settings, r, true).await,
            JobCommand::Audit(args) => crate::audit::run(settings, &args),
        }
    })
}

/// The coordinator's address: given, or the local node's first TCP loopback address.
fn coordinator_addr(settings: &Settings, given: Option<Multiaddr>) -> anyhow::Result<Multiaddr> {
    if let Some(a) = given {
        return Ok(a);
    }
    let recorded = settings.data_dir.join("control.addr");
    let control: SocketAddr = std::fs::read_to_string(&recorded)
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .with_context(|| {
            format!(
                "no --coordinator given and no node running from {} (start one with `commons node join --coordinator`)",
                settings.data_dir.display()
            )
        })?;
    let status = crate::control::fetch_status(control)?;
    let addrs: Vec<Multiaddr> = status["listen_addrs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a.as_str()?.parse().ok())
        .collect();
    addrs
        .iter()
        .find(|a| a.iter().any(|p| matches!(p, Protocol::Tcp(_))))
        .or(addrs.first())
        .cloned()
        .context("the local node listens on no address")
}

fn client(settings: &Settings, target: &CoordinatorArg) -> anyhow::Result<JobClient> {
    let (identity, _) = crate::identity::load_or_create(&settings.key)?;
    JobClient::new(
        identity,
        coordinator_addr(settings, target.coordinator.clone())?,
    )
}

/// The model id named by `arg`: 64 hex digits, or a file to hash.
pub fn resolve_model(arg: &str) -> anyhow::Result<ModelId> {
    if arg.len() == 64
        && let Ok(h) = arg.parse::<commons_protocol::Hash>()
    {
        return Ok(ModelId(h));
    }
    let path = PathBuf::from(arg);
    if !path.exists() {
        bail!("--model {arg}: neither a model id (64 hex digits) nor an existing file");
    }
    let path = crate::train_export::resolve(&path)?;
    Ok(crate::executor::model_id(&path)?)
}

/// A new random job id.
pub fn new_job_id() -> anyhow::Result<JobId> {
    let mut id = [0u8; 16];
    getrandom::fill(&mut id).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    Ok(JobId(id))
}

/// The report as JSON.
#[must_use]
pub fn report_json(r: &JobReport) -> serde_json::Value {
    let (error_code, error) = match &r.state {
        JobState::Failed { code, message } => (Some(code.name()), Some(message.clone())),
        _ => (None, None),
    };
    let decode_tps = if r.decode_ms > 0 {
        f64::from(r.total_tokens.saturating_sub(1)) * 1e3 / r.decode_ms as f64
    } else {
        0.0
    };
    serde_json::json!({
        "job": r.job.to_string(),
        "model": r.model.to_string(),
        "coordinator": r.coordinator.to_string(),
        "state": r.state.name(),
        "error_code": error_code,
        "error": error,
        "prompt_tokens": r.prompt_tokens,
        "generated_tokens": r.total_tokens,
        "text": r.text,
        "route": r.route.iter().map(|h| serde_json::json!({
            "node": h.node.to_string(),
            "layers": h.layers.to_string(),
            "results": h.results,
        })).collect::<Vec<_>>(),
        "failovers": r.failovers,
        "receipts": r.receipts,
        "transcript": r.transcript.to_string(),
        "audit": r.audit.map(|a| serde_json::json!({
            "entries": a.entries,
            "head": a.head.to_string(),
        })),
        "verified": r.verified,
        "check_units": r.check_units,
        "revisions": r.revisions,
        "prefill_ms": r.prefill_ms,
        "decode_ms": r.decode_ms,
        "decode_tokens_per_sec": decode_tps,
    })
}

/// Prints the route, speed and receipts of a finished job to stderr.
pub fn print_summary(r: &JobReport) {
    eprintln!("job {} {}", r.job, r.state.name());
    if let JobState::Failed { code, message } = &r.state {
        eprintln!("  error: {message} ({code})");
    }
    for h in r.route.iter() {
        eprintln!(
            "  layers {:>7}  node {}  {} signed results",
            h.layers.to_string(),
            h.node,
            h.results
        );
    }
    let j = report_json(r);
    eprintln!(
        "  prefill: {} tokens in {} ms; decode: {} tokens in {} ms ({:.1} tok/s); failovers: {}",
        r.prompt_tokens,
        r.prefill_ms,
        r.total_tokens,
        r.decode_ms,
        j["decode_tokens_per_sec"].as_f64().unwrap_or(0.0),
        r.failovers
    );
    eprintln!(
        "  receipts: {} signed results, each committed by blake3; transcript {}",
        r.receipts, r.transcript
    );
    eprintln!(
        "  verification: {} steps re-executed by another node and agreed ({} check units){}",
        r.verified,
        r.check_units,
        if r.revisions > 0 {
            format!(
                "; revised {} times after a node lost a dispute",
                r.revisions
            )
        } else {
            String::new()
        }
    );
}

async fn submit(settings: &Settings, args: SubmitArgs) -> anyhow::Result<ExitCode> {
    let model = resolve_model(&args.model)?;
    let coalition = args
        .coalition
        .as_deref()
        .map(crate::coalition::resolve_id)
        .transpose()?;
    let mut client = client(settings, &args.target)?;
    let spec = JobSpec {
        job: match args.job_id {
            Some(id) => id,
            None => new_job_id()?,
        },
        model,
        input: if args.chat {
            JobInput::user(args.prompt)
        } else {
            JobInput::Text(args.prompt)
        },
        max_tokens: args.max_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            repetition_penalty: args.repeat_penalty,
            seed: args.seed,
        },
        coalition,
    };
    if !args.target.json {
        eprintln!("job {}", spec.job);
    }
    let json = args.target.json;
    let mut printed = 0usize;
    let mut tokens: Vec<u32> = Vec::new();
    let mut stdout = std::io::stdout();
    let report = client
        .run(spec, Duration::from_secs(60), |r| {
            tokens.truncate(r.from_token as usize);
            tokens.extend(r.tokens.iter());
            if json {
                return;
            }
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
    save_report(&client, args.save_report.as_ref())?;
    if json {
        let mut value = report_json(&report);
        value["tokens"] = serde_json::json!(tokens);
        println!("{value}");
    } else {
        println!();
        print_summary(&report);
    }
    Ok(match report.state {
        JobState::Stopped | JobState::Length => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    })
}

async fn status(settings: &Settings, r: JobRef, cancel: bool) -> anyhow::Result<ExitCode> {
    let mut client = client(settings, &r.target)?;
    let op = if cancel {
        JobOp::Cancel { job: r.job }
    } else {
        JobOp::Watch {
            job: r.job,
            from_token: 0,
            wait_ms: 0,
        }
    };
    let report = client.request(op).await?;
    save_report(&client, r.save_report.as_ref())?;
    if r.target.json {
        println!("{}", report_json(&report));
    } else {
        println!("{}", report.text);
        print_summary(&report);
    }
    Ok(ExitCode::SUCCESS)
}
