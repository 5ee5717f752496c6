//! `commons sim run | sweep` from the command line: outputs written, stamped
//! with seed and scenario hash, and equal seeds giving equal runs.
#![allow(clippy::unwrap_used)] // helpers of tests may fail loudly

use commons_tests::{commons, output, stderr, stdout};

fn scenario(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("short.toml");
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../sim/scenarios/steady.toml"),
    )
    .unwrap()
    .replace("duration_s = 43200", "duration_s = 900");
    std::fs::write(&path, text).unwrap();
    path
}

fn summary(out: &std::process::Output) -> serde_json::Value {
    let text = stdout(out);
    let json = &text[text.find('{').unwrap()..];
    serde_json::from_str(json).unwrap()
}

#[test]
fn sim_run_writes_its_outputs_and_repeats_itself_by_seed() {
    let home = tempfile::tempdir().unwrap();
    let s = scenario(home.path());
    let out_dir = home.path().join("out");
    let run = |seed: &str, out: Option<&std::path::Path>| {
        let mut cmd = commons(home.path());
        cmd.args(["sim", "run", s.to_str().unwrap(), "--seed", seed]);
        if let Some(o) = out {
            cmd.args(["--out", o.to_str().unwrap(), "--events"]);
        }
        let o = output(&mut cmd);
        assert!(o.status.success(), "{}", stderr(&o));
        o
    };
    let first = run("5", Some(&out_dir));
    assert!(
        stdout(&first).starts_with("scenario steady ("),
        "{}",
        stdout(&first)
    );
    let a = summary(&first);
    let b = summary(&run("5", None));
    let c = summary(&run("6", None));
    assert_eq!(a["event_log_hash"], b["event_log_hash"]);
    assert_ne!(a["event_log_hash"], c["event_log_hash"]);
    assert!(a["jobs_done"].as_u64().unwrap() > 0, "{a}");
    let csv = std::fs::read_to_string(out_dir.join("timeseries.csv")).unwrap();
    assert!(csv.starts_with("# scenario=steady hash="), "{csv}");
    assert!(csv.lines().count() > 10);
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("summary.json")).unwrap())
            .unwrap();
    assert_eq!(written["seed"], 5);
    assert!(
        std::fs::read_to_string(out_dir.join("events.jsonl"))
            .unwrap()
            .lines()
            .count()
            > 100
    );

    let sweep =
        output(commons(home.path()).args(["sim", "sweep", s.to_str().unwrap(), "--seeds", "1..3"]));
    assert!(sweep.status.success(), "{}", stderr(&sweep));
    assert!(stdout(&sweep).contains("jobs_done"), "{}", stdout(&sweep));
    assert!(stdout(&sweep).contains('±'));
    for plot in ["nodes.svg", "coverage.svg", "throughput.svg", "jobs.svg"] {
        let svg = std::fs::read_to_string(out_dir.join(plot)).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("seed 5"), "{plot}");
    }
    // Churn from a trace instead of the distributions.
    let trace = home.path().join("trace.csv");
    std::fs::write(&trace, "node,join_s,leave_s\n1,0,600\n2,0,300\n3,100,900\n").unwrap();
    let traced = output(commons(home.path()).args([
        "sim",
        "run",
        s.to_str().unwrap(),
        "--trace",
        trace.to_str().unwrap(),
    ]));
    assert!(traced.status.success(), "{}", stderr(&traced));
    assert!(
        stderr(&traced).contains("replaying 3 sessions"),
        "{}",
        stderr(&traced)
    );
    assert_eq!(summary(&traced)["sessions_ended"], 3);
    let bad = output(commons(home.path()).args(["sim", "run", "/nonexistent.toml"]));
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).contains("cannot read the scenario"),
        "{}",
        stderr(&bad)
    );
}
