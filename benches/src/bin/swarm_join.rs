//! Time until every node of a local swarm sees every other, for N = 2, 5 and
//! 10 `commons node join` processes on 127.0.0.1 (mDNS off, one bootstrap),
//! and the advert bytes a node originates per minute.
//!
//! Run it with `scripts/bench-swarm.sh` (release build of `commons`).

use std::time::{Duration, Instant};

use commons_tests::node::{Node, Transports, wait_until};

fn main() -> anyhow::Result<()> {
    let ttl = 30;
    println!(
        "machine: {} threads; command: {}",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        std::env::args().collect::<Vec<_>>().join(" ")
    );
    println!("{:>4} {:>14}", "N", "all see all (s)");
    for n in [2usize, 5, 10] {
        let home = tempfile::tempdir()?;
        let start = Instant::now();
        let boot = Node::start(
            home.path(),
            &home.path().join("n0"),
            &[],
            Transports::Tcp,
            ttl,
        );
        let via = vec![boot.addrs[0].clone()];
        let others: Vec<Node> = (1..n)
            .map(|i| {
                Node::start(
                    home.path(),
                    &home.path().join(format!("n{i}")),
                    &via,
                    Transports::Tcp,
                    ttl,
                )
            })
            .collect();
        let all: Vec<&Node> = std::iter::once(&boot).chain(others.iter()).collect();
        let took = wait_until(Duration::from_secs(120), || {
            all.iter()
                .all(|node| node.peer_ids(home.path()).len() == n - 1)
        });
        match took {
            Some(_) => println!("{n:>4} {:>14.2}", start.elapsed().as_secs_f64()),
            None => println!("{n:>4} {:>14}", "> 120"),
        }
        if n == 5 {
            // Advert traffic a node originates: envelope size times publications per minute.
            let before = boot
                .status(home.path())
                .map(|s| s["counters"]["adverts_published"].as_u64().unwrap_or(0))
                .unwrap_or(0);
            let window = Duration::from_secs(ttl);
            std::thread::sleep(window);
            let s = boot.status(home.path()).unwrap_or_default();
            let published = s["counters"]["adverts_published"].as_u64().unwrap_or(0) - before;
            let bytes = s["counters"]["advert_bytes"].as_u64().unwrap_or(0);
            let per_min = (published * bytes) as f64 * 60.0 / window.as_secs_f64();
            println!(
                "advert: {bytes} bytes; {published} published in {}s (TTL {ttl}s); {per_min:.0} bytes per node per minute originated",
                window.as_secs()
            );
        }
    }
    Ok(())
}
