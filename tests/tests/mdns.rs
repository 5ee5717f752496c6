//! mDNS discovery between two network namespaces this test creates (the only
//! place multicast is allowed): two nodes with no bootstrap address find each
//! other over a veth pair. Needs root and iproute2 (`.ci/run` runs as root).
#![allow(clippy::unwrap_used)] // helpers of tests may fail loudly

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("iproute2 (`ip`) is needed for this test");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two namespaces joined by a veth pair on 10.231.7.0/24, removed on drop.
struct Link {
    names: [String; 2],
}

impl Link {
    fn new() -> Self {
        let tag = std::process::id() % 100_000;
        let names = [format!("cm{tag}a"), format!("cm{tag}b")];
        for (i, ns) in names.iter().enumerate() {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            let _ = i;
        }
        let (va, vb) = (format!("v{tag}a"), format!("v{tag}b"));
        ip(&[
            "link", "add", &va, "netns", &names[0], "type", "veth", "peer", "name", &vb, "netns",
            &names[1],
        ]);
        for (ns, dev, addr) in [
            (&names[0], &va, "10.231.7.1/24"),
            (&names[1], &vb, "10.231.7.2/24"),
        ] {
            ip(&["-n", ns, "addr", "add", addr, "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up", "multicast", "on"]);
            ip(&["-n", ns, "route", "add", "224.0.0.0/4", "dev", dev]);
        }
        Self { names }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        for ns in &self.names {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

struct NsNode {
    child: Child,
    ns: String,
    peer_id: String,
    control: String,
}

impl NsNode {
    fn start(ns: &str, home: &std::path::Path, name: &str) -> Self {
        let bin = commons_tests::commons_bin();
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(bin)
            .arg("--data-dir")
            .arg(home.join(name))
            .args([
                "node",
                "join",
                "--listen",
                "/ip4/0.0.0.0/tcp/4001",
                "--control",
                "127.0.0.1:7717",
                "--advert-ttl",
                "10",
            ])
            .env("HOME", home)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let Some(Ok(line)) = lines.next() else { break };
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if v["event"] == "joined" {
                let (peer_id, control) = (
                    v["peer_id"].as_str().unwrap().to_owned(),
                    v["control"].as_str().unwrap().to_owned(),
                );
                std::thread::spawn(move || for _ in lines.by_ref() {});
                return Self {
                    child,
                    ns: ns.to_owned(),
                    peer_id,
                    control,
                };
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("node in {ns} did not start");
    }

    fn peers(&self) -> Vec<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .arg(commons_tests::commons_bin())
            .args(["node", "status", "--json", "--control", &self.control])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v["peers"]
            .as_array()
            .map(|ps| {
                ps.iter()
                    .filter_map(|p| p["peer_id"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for NsNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn nodes_in_two_namespaces_find_each_other_by_mdns() {
    let link = Link::new();
    let home = tempfile::tempdir().unwrap();
    let a = NsNode::start(&link.names[0], home.path(), "a");
    let b = NsNode::start(&link.names[1], home.path(), "b");
    let found = commons_tests::node::wait_until(Duration::from_secs(60), || {
        a.peers().contains(&b.peer_id) && b.peers().contains(&a.peer_id)
    });
    assert!(
        found.is_some(),
        "mDNS discovery across the veth pair failed: a ({}) sees {:?}, b ({}) sees {:?}",
        a.peer_id,
        a.peers(),
        b.peer_id,
        b.peers()
    );
}
