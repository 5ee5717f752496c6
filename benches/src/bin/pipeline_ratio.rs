//! Prints, from one run on this machine, what splitting the model over
//! processes costs, all on 127.0.0.1 with the release `commons` binary:
//!
//! 1. prefill and decode tokens/s of a job through a coordinator and three
//!    node processes (layers 0..10, 10..20, 20..30) against `commons run` in
//!    one process, same prompt, greedy, same `--max-tokens`; medians of
//!    `--runs` interleaved repetitions, the ratio pipeline / single, and
//!    whether the tokens are the same;
//! 2. the latency a hop adds: the difference in decode ms/token divided by
//!    the three hops;
//! 3. with a second node on the middle range, the time from a `kill -9` of
//!    the middle node serving a long job to the next token the member sees,
//!    median of `--trials`.
//!
//! Run it with `cargo build --release -p commons-node --bin commons` then
//! `cargo run --release -p commons-benches --bin pipeline-ratio`. The
//! `commons` binary is `$COMMONS_BIN`, else `target/release/commons`.

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use commons_benches::{commons_bin, machine, median, model_path};
use commons_node::job_cli::{JobClient, new_job_id};
use commons_protocol::messages::{JobInput, JobOp, JobReport, JobSpec, JobState, SamplingParams};

/// Environment variable naming the `commons` binary to measure.
/// A prompt the bundled model answers at length.
const PROMPT: &str = "Tell me a long story about a lighthouse keeper.";
/// The three stages of the pipeline (the bundled model has 30 layers).
const STAGES: [&str; 3] = ["0..10", "10..20", "20..30"];
/// The stage that gets a replica and loses a node in the failover trials.
const MIDDLE: &str = "10..20";
/// Longest wait for a process to start or the coordinator to see the nodes.
const START_LIMIT: Duration = Duration::from_secs(90);
/// Longest a `commons run` or a job may take.
const JOB_LIMIT: Duration = Duration::from_secs(300);

/// What the command line asks.
#[derive(Debug)]
struct Opts {
    runs: usize,
    max_tokens: u32,
    trials: usize,
    failover_tokens: u32,
    kill_after: u32,
    prompt: String,
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn arg_value(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn run() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let parse = |name: &str, default: usize| -> anyhow::Result<usize> {
        arg_value(&args, name).map_or(Ok(default), |v| {
            v.parse().with_context(|| format!("{name} {v}"))
        })
    };
    let opts = Opts {
        runs: parse("--runs", 3)?.max(1),
        max_tokens: u32::try_from(parse("--max-tokens", 128)?)?,
        trials: parse("--trials", 3)?,
        failover_tokens: u32::try_from(parse("--failover-tokens", 200)?)?,
        kill_after: u32::try_from(parse("--kill-after", 30)?)?,
        prompt: arg_value(&args, "--prompt").unwrap_or_else(|| PROMPT.to_owned()),
    };
    ensure!(
        opts.kill_after + 10 < opts.failover_tokens,
        "--kill-after must leave at least 10 of --failover-tokens to generate after the kill"
    );
    let bin = commons_bin()?;
    let model = model_path()?.canonicalize()?;

    println!("machine: {}", machine());
    println!(
        "threads: RAYON_NUM_THREADS={}",
        std::env::var("RAYON_NUM_THREADS").unwrap_or_default()
    );
    println!("command: {}", args.join(" "));
    println!("commons: {}", bin.display());
    println!("model:   {}", model.display());
    println!(
        "prompt:  {:?} (chat template, greedy, --max-tokens {})",
        opts.prompt, opts.max_tokens
    );
    println!();

    let home = tempfile::tempdir()?;
    let commons = Commons {
        bin,
        home: home.path().to_owned(),
        model,
    };
    let started = Instant::now();
    let mut swarm = Swarm::start(&commons)?;
    for layers in STAGES {
        swarm.serve(layers)?;
    }
    swarm.wait_for_servers(None)?;
    println!(
        "swarm: a coordinator and {} nodes ({}) on 127.0.0.1, ready in {:.1} s",
        STAGES.len(),
        STAGES.join(", "),
        started.elapsed().as_secs_f64()
    );
    println!();

    let (single, pipeline) = throughput(&commons, &swarm, &opts)?;
    per_hop(&single, &pipeline);
    println!();
    failover(&commons, &mut swarm, &opts)?;
    Ok(())
}

/// How to run `commons` here: the binary, a private home for its settings,
/// scratch files and data directories, and the model file.
#[derive(Debug)]
struct Commons {
    bin: PathBuf,
    home: PathBuf,
    model: PathBuf,
}

impl Commons {
    /// A `commons` command that never touches the user's own settings.
    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.env("HOME", &self.home)
            .env("XDG_CONFIG_HOME", self.home.join("config"))
            .env("XDG_DATA_HOME", self.home.join("data"))
            .env("COMMONS_LOG", "warn")
            .env_remove("COMMONS_CONFIG")
            .env_remove("COMMONS_DATA_DIR")
            .env_remove("COMMONS_KEY")
            .env_remove("COMMONS_MODEL")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null());
        cmd
    }

    fn model_arg(&self) -> String {
        self.model.to_string_lossy().into_owned()
    }

    /// Runs `cmd` to its end, at most `limit`, and parses its stdout as one JSON object.
    fn json(&self, mut cmd: Command, limit: Duration) -> anyhow::Result<serde_json::Value> {
        static RUNS: AtomicUsize = AtomicUsize::new(0);
        let n = RUNS.fetch_add(1, Ordering::Relaxed);
        let (out, err) = (
            self.home.join(format!("run{n}.out")),
            self.home.join(format!("run{n}.err")),
        );
        let mut child = ChildGuard(
            cmd.stdout(std::fs::File::create(&out)?)
                .stderr(std::fs::File::create(&err)?)
                .spawn()
                .with_context(|| format!("cannot start {cmd:?}"))?,
        );
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = child.0.try_wait()? {
                break status;
            }
            ensure!(
                Instant::now() < deadline,
                "{cmd:?} did not finish within {} s",
                limit.as_secs()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let stdout = std::fs::read_to_string(&out)?;
        ensure!(
            status.success(),
            "{cmd:?} failed ({status}): {}",
            tail(&err)
        );
        serde_json::from_str(stdout.trim()).with_context(|| format!("{cmd:?} printed {stdout:?}"))
    }

    /// `commons run --json` on one process.
    fn single(&self, prompt: &str, max_tokens: u32) -> anyhow::Result<Measured> {
        let mut cmd = self.command();
        cmd.args(["run", "--json", "--chat", "--model", &self.model_arg()])
            .args(["--prompt", prompt, "--max-tokens", &max_tokens.to_string()]);
        let v = self.json(cmd, JOB_LIMIT)?;
        let rate = |key: &str| v[key].as_f64().with_context(|| format!("no {key} in {v}"));
        Ok(Measured {
            prefill_tps: rate("prefill_tokens_per_sec")?,
            decode_tps: rate("decode_tokens_per_sec")?,
            prompt_tokens: v["prompt_tokens"].as_u64().unwrap_or(0),
            tokens: tokens(&v)?,
        })
    }
}

/// The last lines of a log file, for error messages.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}

/// The `tokens` array of a JSON report.
fn tokens(v: &serde_json::Value) -> anyhow::Result<Vec<u32>> {
    v["tokens"]
        .as_array()
        .with_context(|| format!("no tokens in {v}"))?
        .iter()
        .map(|t| {
            t.as_u64()
                .and_then(|t| u32::try_from(t).ok())
                .context("a token is not a u32")
        })
        .collect()
}

/// A child process, killed and reaped when dropped (on success and on error alike).
#[derive(Debug)]
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A `commons node join` process.
#[derive(Debug)]
struct Proc {
    child: ChildGuard,
    peer_id: String,
    control: SocketAddr,
    /// Its TCP listen address, with `/p2p/<PeerId>`.
    address: String,
}

impl Proc {
    /// Starts `commons node join` with `data_dir` and `extra` arguments and
    /// waits (bounded) for its `joined` and `listening` events.
    fn start(commons: &Commons, data_dir: &Path, extra: &[&str]) -> anyhow::Result<Self> {
        let log = data_dir.with_extension("log");
        let mut cmd = commons.command();
        cmd.arg("--data-dir").arg(data_dir).args([
            "node",
            "join",
            "--no-mdns",
            "--control",
            "127.0.0.1:0",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
        ]);
        cmd.args(extra)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?);
        let mut child = ChildGuard(
            cmd.spawn()
                .with_context(|| format!("cannot start {cmd:?}"))?,
        );
        let stdout = child.0.stdout.take().context("stdout is piped")?;
        let (tx, rx) = std::sync::mpsc::channel();
        // Reads every line to the end, so that the node never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    let _ = tx.send(v);
                }
            }
        });
        let deadline = Instant::now() + START_LIMIT;
        let (mut peer_id, mut control, mut address) = (None, None, None);
        while peer_id.is_none() || control.is_none() || address.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(v) = rx.recv_timeout(left) else {
                bail!(
                    "{cmd:?} did not start within {} s: {}",
                    START_LIMIT.as_secs(),
                    tail(&log)
                );
            };
            match v["event"].as_str() {
                Some("joined") => {
                    peer_id = v["peer_id"].as_str().map(str::to_owned);
                    control = v["control"].as_str().and_then(|c| c.parse().ok());
                }
                Some("listening") => address = v["address"].as_str().map(str::to_owned),
                _ => {}
            }
        }
        Ok(Self {
            child,
            peer_id: peer_id.context("no peer id")?,
            control: control.context("no control address")?,
            address: address.context("no listen address")?,
        })
    }
}

/// A coordinator and the nodes serving through it; every process is killed when dropped.
#[derive(Debug)]
struct Swarm<'a> {
    commons: &'a Commons,
    coordinator: Proc,
    nodes: Vec<(String, Proc)>,
    started: usize,
}

impl<'a> Swarm<'a> {
    /// Starts the coordinator.
    fn start(commons: &'a Commons) -> anyhow::Result<Self> {
        let model = commons.model_arg();
        let coordinator = Proc::start(
            commons,
            &commons.home.join("coordinator"),
            &["--coordinator", "--model", &model],
        )?;
        Ok(Self {
            commons,
            coordinator,
            nodes: Vec::new(),
            started: 0,
        })
    }

    /// Starts a node serving `layers`, bootstrapped from the coordinator.
    fn serve(&mut self, layers: &str) -> anyhow::Result<()> {
        self.started += 1;
        let model = self.commons.model_arg();
        let node = Proc::start(
            self.commons,
            &self.commons.home.join(format!("node{}", self.started)),
            &[
                "--bootstrap",
                &self.coordinator.address,
                "--model",
                &model,
                "--layers",
                layers,
            ],
        )?;
        self.nodes.push((layers.to_owned(), node));
        Ok(())
    }

    /// Waits (bounded) until the coordinator has the advert of every live
    /// node, and no longer lists `gone` among the serving peers; returns the time it took.
    fn wait_for_servers(&self, gone: Option<&str>) -> anyhow::Result<Duration> {
        let started = Instant::now();
        loop {
            let status = commons_node::control::fetch_status(self.coordinator.control)?;
            let serving: Vec<&str> = status["peers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["models"].as_array().is_some_and(|m| !m.is_empty()))
                .filter_map(|p| p["peer_id"].as_str())
                .collect();
            let live = self
                .nodes
                .iter()
                .all(|(_, n)| serving.contains(&n.peer_id.as_str()));
            if live && gone.is_none_or(|g| !serving.contains(&g)) {
                return Ok(started.elapsed());
            }
            ensure!(
                started.elapsed() < START_LIMIT,
                "the coordinator did not see the {} serving nodes (and only them) within {} s",
                self.nodes.len(),
                START_LIMIT.as_secs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills the node `peer_id` at once (SIGKILL, as a crash would); returns
    /// the instant the signal was sent.
    fn kill(&mut self, peer_id: &str) -> anyhow::Result<Instant> {
        let index = self
            .nodes
            .iter()
            .position(|(_, n)| n.peer_id == peer_id)
            .with_context(|| format!("no node {peer_id} in this swarm"))?;
        let (_, mut node) = self.nodes.remove(index);
        node.child.0.kill()?;
        let at = Instant::now();
        node.child.0.wait()?;
        Ok(at)
    }

    /// `commons job submit --json` of a member, to its end.
    fn submit(&self, prompt: &str, max_tokens: u32) -> anyhow::Result<Measured> {
        let mut cmd = self.commons.command();
        cmd.arg("--data-dir")
            .arg(self.commons.home.join("member"))
            .args(["job", "submit", "--json", "--chat"])
            .args(["--coordinator", &self.coordinator.address])
            .args(["--model", &self.commons.model_arg()])
            .args(["--prompt", prompt, "--max-tokens", &max_tokens.to_string()]);
        let v = self.commons.json(cmd, JOB_LIMIT)?;
        ensure!(
            matches!(v["state"].as_str(), Some("stop" | "length")),
            "the job ended {}: {}",
            v["state"],
            v["error"]
        );
        let prompt_tokens = v["prompt_tokens"].as_u64().unwrap_or(0);
        let prefill_ms = v["prefill_ms"].as_u64().unwrap_or(0);
        Ok(Measured {
            prefill_tps: prompt_tokens as f64 * 1e3 / prefill_ms.max(1) as f64,
            decode_tps: v["decode_tokens_per_sec"]
                .as_f64()
                .with_context(|| format!("no decode_tokens_per_sec in {v}"))?,
            prompt_tokens,
            tokens: tokens(&v)?,
        })
    }
}

/// One generation: its rates, as the program measured them, and its tokens.
#[derive(Debug)]
struct Measured {
    prefill_tps: f64,
    decode_tps: f64,
    prompt_tokens: u64,
    tokens: Vec<u32>,
}

/// Medians of repeated measurements of one system.
#[derive(Debug)]
struct Rates {
    prefill_tps: f64,
    decode_tps: f64,
}

/// Part 1: `commons run` and the pipeline, interleaved; prints every run,
/// the medians and the ratios.
fn throughput(commons: &Commons, swarm: &Swarm<'_>, opts: &Opts) -> anyhow::Result<(Rates, Rates)> {
    // Warm-up: the first job opens the connections between the processes.
    swarm.submit(&opts.prompt, 8)?;
    commons.single(&opts.prompt, 8)?;

    println!(
        "{:>3}  {:<26} {:>7} {:>9} {:>14} {:>13}  same tokens",
        "run", "system", "prompt", "generated", "prefill tok/s", "decode tok/s"
    );
    let (mut singles, mut pipes) = (Vec::new(), Vec::new());
    let mut same = 0;
    for run in 1..=opts.runs {
        let single = commons.single(&opts.prompt, opts.max_tokens)?;
        let pipe = swarm.submit(&opts.prompt, opts.max_tokens)?;
        let equal = pipe.tokens == single.tokens;
        same += usize::from(equal);
        for (name, m, note) in [
            ("commons run (1 process)", &single, ""),
            (
                "pipeline (3 node procs)",
                &pipe,
                if equal { "yes" } else { "NO" },
            ),
        ] {
            println!(
                "{run:>3}  {name:<26} {:>7} {:>9} {:>14.1} {:>13.1}  {note}",
                m.prompt_tokens,
                m.tokens.len(),
                m.prefill_tps,
                m.decode_tps
            );
        }
        singles.push(single);
        pipes.push(pipe);
    }
    let medians = |ms: &[Measured]| Rates {
        prefill_tps: median(ms.iter().map(|m| m.prefill_tps).collect()),
        decode_tps: median(ms.iter().map(|m| m.decode_tps).collect()),
    };
    let (single, pipe) = (medians(&singles), medians(&pipes));
    println!();
    for (name, r) in [("commons run", &single), ("pipeline", &pipe)] {
        println!(
            "median of {}, {name:<11}: prefill {:>6.1} tok/s, decode {:>5.1} tok/s ({:.2} ms/token)",
            opts.runs,
            r.prefill_tps,
            r.decode_tps,
            1e3 / r.decode_tps
        );
    }
    let decode = pipe.decode_tps / single.decode_tps;
    println!(
        "ratio pipeline / single: decode {decode:.2}x (goal >= 0.90x: {}), prefill {:.2}x",
        if decode >= 0.9 { "met" } else { "not met" },
        pipe.prefill_tps / single.prefill_tps
    );
    println!(
        "tokens: the pipeline's equal commons run's in {same} of {} runs",
        opts.runs
    );
    Ok((single, pipe))
}

/// Part 2: decode latency a hop adds.
fn per_hop(single: &Rates, pipe: &Rates) {
    let (s, p) = (1e3 / single.decode_tps, 1e3 / pipe.decode_tps);
    let hops = STAGES.len();
    println!(
        "per-hop overhead: ({p:.2} - {s:.2}) ms/token / {hops} hops = {:.2} ms per hop per token",
        (p - s) / hops as f64
    );
}

/// What one failover trial saw.
#[derive(Debug)]
struct Trial {
    /// When the node was killed.
    killed_at: Instant,
    tokens_at_kill: u32,
    /// Kill to the next token the member saw.
    next_token: Duration,
    /// Kill to the first token reported together with the failover.
    after_failover: Option<Duration>,
    /// Time per token before the kill.
    interval: Duration,
    failovers: u32,
    tokens: Vec<u32>,
}

/// Part 3: a second node on the middle range, then `--trials` long jobs, each
/// losing its middle node to `kill -9` after `--kill-after` tokens.
fn failover(commons: &Commons, swarm: &mut Swarm<'_>, opts: &Opts) -> anyhow::Result<()> {
    if opts.trials == 0 {
        return Ok(());
    }
    swarm.serve(MIDDLE)?;
    swarm.wait_for_servers(None)?;
    let reference = commons.single(&opts.prompt, opts.failover_tokens)?.tokens;
    ensure!(
        reference.len() as u32 > opts.kill_after + 10,
        "the prompt yields only {} tokens; the trials need more than {}",
        reference.len(),
        opts.kill_after + 10
    );
    println!(
        "failover: a second node on {MIDDLE}; jobs of --max-tokens {}, the serving {MIDDLE} node killed (SIGKILL) after {} tokens, then replaced",
        opts.failover_tokens, opts.kill_after
    );
    println!(
        "{:>5}  {:>14} {:>16} {:>22} {:>15} {:>9}  same tokens as commons run",
        "trial",
        "tokens at kill",
        "kill->next (ms)",
        "kill->after failover",
        "ms/token before",
        "failovers"
    );
    let model = commons_node::executor::model_id(&commons.model)?;
    let member =
        commons_node::identity::generate().map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut client =
        runtime.block_on(async { JobClient::new(member, swarm.coordinator.address.parse()?) })?;
    let (mut next, mut after) = (Vec::new(), Vec::new());
    for trial in 1..=opts.trials {
        let spec = JobSpec {
            job: new_job_id()?,
            model,
            input: JobInput::user(opts.prompt.clone()),
            max_tokens: opts.failover_tokens,
            sampling: SamplingParams {
                temperature: 0.0,
                top_k: 0,
                top_p: 1.0,
                repetition_penalty: 1.0,
                seed: 299_792_458,
            },
            coalition: None,
        };
        let (t, victim) =
            runtime.block_on(kill_mid_job(&mut client, swarm, spec, opts.kill_after))?;
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!(
            "{trial:>5}  {:>14} {:>16.0} {:>22} {:>15.2} {:>9}  {}",
            t.tokens_at_kill,
            ms(t.next_token),
            t.after_failover
                .map_or_else(|| "-".to_owned(), |d| format!("{:.0} ms", ms(d))),
            ms(t.interval),
            t.failovers,
            if t.tokens == reference { "yes" } else { "NO" }
        );
        next.push(ms(t.next_token));
        after.extend(t.after_failover.map(ms));
        // Replace the dead node for the next trial.
        swarm.serve(MIDDLE)?;
        swarm.wait_for_servers(Some(&victim))?;
        println!(
            "{:>5}  replaced; the coordinator listed the new node and no longer the dead one {:.1} s after the kill",
            "",
            t.killed_at.elapsed().as_secs_f64()
        );
    }
    println!(
        "median over {} trials: kill -> next token {:.0} ms; kill -> first token reported with the failover {}",
        opts.trials,
        median(next),
        if after.is_empty() {
            "- (none seen)".to_owned()
        } else {
            format!("{:.0} ms", median(after))
        }
    );
    Ok(())
}

/// Runs `spec` through `client`, watching every token as it comes; kills the
/// node serving the middle range once `kill_after` tokens are out. Returns
/// what it saw and the PeerId of the node it killed.
async fn kill_mid_job(
    client: &mut JobClient,
    swarm: &mut Swarm<'_>,
    spec: JobSpec,
    kill_after: u32,
) -> anyhow::Result<(Trial, String)> {
    let job = spec.job;
    let started = Instant::now();
    let mut report = client.request(JobOp::Submit(spec)).await?;
    let mut tokens: Vec<u32> = Vec::new();
    // (when, tokens out) at each report with new tokens, until the kill.
    let mut seen: Vec<(Instant, u32)> = Vec::new();
    // (when, tokens out, failovers) at the kill.
    let mut killed: Option<(Instant, u32, u32)> = None;
    let mut victim = String::new();
    let (mut next_token, mut after_failover) = (None, None);
    loop {
        let now = Instant::now();
        merge(&mut tokens, &report);
        match killed {
            None if report.total_tokens > 0 => seen.push((now, report.total_tokens)),
            Some((at, out, failovers)) if report.total_tokens > out => {
                next_token.get_or_insert(now - at);
                if report.failovers > failovers {
                    after_failover.get_or_insert(now - at);
                }
            }
            _ => {}
        }
        if report.state.is_terminal() {
            break;
        }
        if killed.is_none() && report.total_tokens >= kill_after {
            victim = report
                .route
                .iter()
                .find(|h| h.layers.to_string() == MIDDLE && h.results > 0)
                .map(|h| h.node.to_string())
                .with_context(|| format!("no {MIDDLE} hop with results in the route"))?;
            let at = swarm.kill(&victim)?;
            killed = Some((at, report.total_tokens, report.failovers));
        }
        ensure!(
            started.elapsed() < JOB_LIMIT,
            "job {job} did not finish within {} s",
            JOB_LIMIT.as_secs()
        );
        report = client
            .request(JobOp::Watch {
                job,
                from_token: tokens.len() as u32,
                wait_ms: 10_000,
            })
            .await?;
    }
    ensure!(
        matches!(report.state, JobState::Stopped | JobState::Length),
        "job {job} ended {}",
        report.state.name()
    );
    let (Some((killed_at, tokens_at_kill, _)), Some(next_token)) = (killed, next_token) else {
        bail!(
            "job {job} ended after {} tokens, before the kill or before a token after it",
            report.total_tokens
        );
    };
    // Time per token before the kill, from the first report with tokens to the last.
    let interval = match (seen.first(), seen.last()) {
        (Some(&(t0, n0)), Some(&(t1, n1))) if n1 > n0 => (t1 - t0) / (n1 - n0),
        _ => Duration::ZERO,
    };
    Ok((
        Trial {
            killed_at,
            tokens_at_kill,
            next_token,
            after_failover,
            interval,
            failovers: report.failovers,
            tokens,
        },
        victim,
    ))
}

/// Adds the tokens of `report` (which start at its `from_token`) to `tokens`.
fn merge(tokens: &mut Vec<u32>, report: &JobReport) {
    tokens.truncate(report.from_token as usize);
    tokens.extend(report.tokens.iter());
}
