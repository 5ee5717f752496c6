//! `commons run` end to end on the bundled model (fetched by scripts/fetch-model.sh).
#![allow(clippy::unwrap_used)] // helpers of tests may fail loudly

use std::path::PathBuf;

use commons_tests::{commons, output, stderr, stdout};

fn model() -> PathBuf {
    commons_node::run_local::bundled_model().unwrap()
}

fn run_json(home: &std::path::Path, extra: &[&str]) -> serde_json::Value {
    let out = output(
        commons(home)
            .args([
                "run",
                "--json",
                "--max-tokens",
                "12",
                "--prompt",
                "The capital of France is",
                "--model",
            ])
            .arg(model())
            .args(extra),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_str(stdout(&out).trim()).unwrap()
}

#[test]
fn run_generates_and_reports_speed() {
    let home = tempfile::tempdir().unwrap();
    let whole = run_json(home.path(), &[]);
    assert!(
        whole["text"].as_str().unwrap().starts_with(" Paris"),
        "{whole}"
    );
    assert!(whole["prefill_tokens_per_sec"].as_f64().unwrap() > 0.0);
    assert!(whole["decode_tokens_per_sec"].as_f64().unwrap() > 0.0);
    assert_eq!(whole["tokens"].as_array().unwrap().len(), 12);
    // The same model split into three in-process stages gives the same tokens.
    let split = run_json(home.path(), &["--layers", "0..10,10..20,20..30"]);
    assert_eq!(split["tokens"], whole["tokens"]);
    assert_eq!(split["model"], whole["model"]);

    // Streaming mode prints the text, then the speeds on stderr.
    let out = output(
        commons(home.path())
            .args([
                "run",
                "--max-tokens",
                "4",
                "--prompt",
                "The capital of France is",
                "--model",
            ])
            .arg(model()),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).starts_with(" Paris"), "{}", stdout(&out));
    assert!(stderr(&out).contains("tok/s"), "{}", stderr(&out));
}

#[test]
fn run_errors_are_clear() {
    let home = tempfile::tempdir().unwrap();
    let missing = output(commons(home.path()).args([
        "run",
        "--prompt",
        "x",
        "--model",
        "/nonexistent/model.gguf",
    ]));
    assert!(!missing.status.success());
    assert!(
        stderr(&missing).contains("not found"),
        "{}",
        stderr(&missing)
    );

    let junk = home.path().join("junk.gguf");
    std::fs::write(&junk, b"not a model").unwrap();
    let out = output(
        commons(home.path())
            .args(["run", "--prompt", "x", "--model"])
            .arg(&junk),
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not a valid GGUF file"),
        "{}",
        stderr(&out)
    );

    for (layers, expected) in [
        ("0..10,10..31", "not within the model's 30 layers"),
        ("0..10,12..30", "gap"),
        ("0..5", "end at layer 5"),
    ] {
        let out = output(
            commons(home.path())
                .args(["run", "--prompt", "x", "--layers", layers, "--model"])
                .arg(model()),
        );
        assert!(!out.status.success(), "{layers}");
        assert!(
            stderr(&out).contains(expected),
            "{layers}: {}",
            stderr(&out)
        );
        assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
    }
}
