//! Running `commons node join` processes in tests.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::commons;

/// A `commons node join` process on loopback, killed when dropped.
#[derive(Debug)]
pub struct Node {
    child: Child,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// Its PeerId.
    pub peer_id: String,
    /// Its control API.
    pub control: String,
    /// Its listen addresses, with `/p2p/<PeerId>`.
    pub addrs: Vec<String>,
    /// The JSON events it printed while starting.
    pub events: Vec<serde_json::Value>,
    lines: mpsc::Receiver<serde_json::Value>,
}

/// Transports a test node listens on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transports {
    /// TCP and QUIC.
    Both,
    /// TCP only.
    Tcp,
    /// QUIC only.
    Quic,
}

impl Node {
    /// Starts a node with `data_dir`, joining through `bootstrap`, with adverts valid `ttl_secs`.
    pub fn start(
        home: &Path,
        data_dir: &Path,
        bootstrap: &[String],
        transports: Transports,
        ttl_secs: u64,
    ) -> Self {
        Self::start_with(home, data_dir, bootstrap, transports, ttl_secs, &[])
    }

    /// [`Node::start`] with more arguments for `commons node join`.
    pub fn start_with(
        home: &Path,
        data_dir: &Path,
        bootstrap: &[String],
        transports: Transports,
        ttl_secs: u64,
        extra: &[&str],
    ) -> Self {
        let mut cmd: Command = commons(home);
        cmd.arg("--data-dir").arg(data_dir).args([
            "node",
            "join",
            "--no-mdns",
            "--control",
            "127.0.0.1:0",
            "--advert-ttl",
            &ttl_secs.to_string(),
        ]);
        if transports != Transports::Quic {
            cmd.args(["--listen", "/ip4/127.0.0.1/tcp/0"]);
        }
        if transports != Transports::Tcp {
            cmd.args(["--listen", "/ip4/127.0.0.1/udp/0/quic-v1"]);
        }
        for b in bootstrap {
            cmd.args(["--bootstrap", b]);
        }
        cmd.args(extra);
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start commons node join");
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                    && tx.send(v).is_err()
                {
                    break;
                }
            }
        });
        let want_addrs = if transports == Transports::Both { 2 } else { 1 };
        let deadline = Instant::now() + Duration::from_secs(30);
        let (mut peer_id, mut control, mut addrs) = (None, None, Vec::new());
        let mut events = Vec::new();
        while (peer_id.is_none() || addrs.len() < want_addrs) && Instant::now() < deadline {
            let Ok(v) = rx.recv_timeout(Duration::from_millis(200)) else {
                continue;
            };
            match v["event"].as_str() {
                Some("joined") => {
                    peer_id = v["peer_id"].as_str().map(str::to_owned);
                    control = v["control"].as_str().map(str::to_owned);
                }
                Some("listening") => addrs.extend(v["address"].as_str().map(str::to_owned)),
                _ => {}
            }
            events.push(v);
        }
        let (Some(peer_id), Some(control)) = (peer_id, control) else {
            let _ = child.kill();
            panic!("node in {} did not start within 30 s", data_dir.display());
        };
        Node {
            child,
            data_dir: data_dir.to_owned(),
            peer_id,
            control,
            addrs,
            events,
            lines: rx,
        }
    }

    /// The first JSON event named `name`, printed while starting or within `limit` after.
    pub fn wait_event(&self, name: &str, limit: Duration) -> Option<serde_json::Value> {
        if let Some(v) = self.events.iter().find(|v| v["event"] == name) {
            return Some(v.clone());
        }
        let deadline = Instant::now() + limit;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(v) if v["event"] == name => return Some(v),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
        None
    }

    /// `commons node status --json` of this node.
    pub fn status(&self, home: &Path) -> Option<serde_json::Value> {
        let out = commons(home)
            .args(["node", "status", "--json", "--control", &self.control])
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// PeerIds in this node's peer table.
    pub fn peer_ids(&self, home: &Path) -> Vec<String> {
        self.status(home)
            .and_then(|s| {
                s["peers"].as_array().map(|ps| {
                    ps.iter()
                        .filter_map(|p| p["peer_id"].as_str().map(str::to_owned))
                        .collect()
                })
            })
            .unwrap_or_default()
    }

    /// Kills the process at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits (bounded) for a clean exit; true if it exited 0 after announcing its leave.
    pub fn terminate(&mut self) -> bool {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                let left = self.lines.try_iter().any(|v| v["event"] == "left");
                return status.success() && left;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill();
        false
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `check` every 200 ms until it holds or `limit` passes; returns the time it took.
pub fn wait_until(limit: Duration, mut check: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if check() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    None
}
