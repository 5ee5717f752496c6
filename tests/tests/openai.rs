//! The OpenAI-compatible API of a coordinating node, spoken to over HTTP as
//! any OpenAI client would: models, chat and text completions, streamed or
//! not, and errors in OpenAI's format. Greedy answers equal `commons run`.
#![allow(clippy::unwrap_used)] // helpers of tests may fail loudly

use std::path::Path;
use std::time::Duration;

use commons_tests::node::{Node, Transports, wait_until};
use commons_tests::{commons, output, stderr, stdout};
use serde_json::{Value, json};

const PROMPT: &str = "What is the capital of France?";

fn model() -> String {
    commons_node::run_local::bundled_model()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

fn reference(home: &Path, prompt: &str, chat: bool, max_tokens: u32) -> String {
    let mut cmd = commons(home);
    cmd.args(["run", "--json", "--model", &model(), "--prompt", prompt]);
    cmd.args(["--max-tokens", &max_tokens.to_string()]);
    if chat {
        cmd.arg("--chat");
    }
    let out = output(&mut cmd);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    v["text"].as_str().unwrap().to_owned()
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(60)))
        .http_status_as_error(false)
        .build()
        .into()
}

fn post(base: &str, path: &str, body: &str) -> (u16, String) {
    let mut r = agent()
        .post(&format!("{base}{path}"))
        .header("content-type", "application/json")
        .send(body)
        .unwrap();
    (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
}

#[test]
fn openai_clients_get_the_swarms_answers_in_openai_format() {
    let home = tempfile::tempdir().unwrap();
    let m = model();
    let coordinator = Node::start_with(
        home.path(),
        &home.path().join("coordinator"),
        &[],
        Transports::Tcp,
        30,
        &["--coordinator", "--model", &m, "--api", "127.0.0.1:0"],
    );
    let api = coordinator
        .events
        .iter()
        .find(|e| e["event"] == "api")
        .and_then(|e| e["address"].as_str())
        .expect("the node printed its API address")
        .to_owned();
    let base = format!("http://{api}/v1");
    let nodes: Vec<Node> = ["0..15", "15..30"]
        .iter()
        .enumerate()
        .map(|(i, layers)| {
            Node::start_with(
                home.path(),
                &home.path().join(format!("node{i}")),
                std::slice::from_ref(&coordinator.addrs[0]),
                Transports::Tcp,
                30,
                &["--model", &m, "--layers", layers],
            )
        })
        .collect();
    let ready = wait_until(Duration::from_secs(30), || {
        coordinator.status(home.path()).is_some_and(|s| {
            nodes.iter().all(|n| {
                s["peers"].as_array().is_some_and(|ps| {
                    ps.iter().any(|p| {
                        p["peer_id"] == n.peer_id.as_str()
                            && p["models"].as_array().is_some_and(|m| !m.is_empty())
                    })
                })
            })
        })
    });
    assert!(ready.is_some(), "the coordinator did not see its nodes");

    // The models.
    let mut r = agent().get(&format!("{base}/models")).call().unwrap();
    let models: Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
    assert_eq!(models["object"], "list");
    let name = models["data"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(name, "SmolLM2-135M-Instruct.Q4_1");

    // A chat completion, greedy: the text of `commons run --chat`.
    let expected = reference(home.path(), PROMPT, true, 24);
    let request = json!({
        "model": name,
        "messages": [{ "role": "user", "content": PROMPT }],
        "max_tokens": 24,
        "temperature": 0,
    });
    let (status, body) = post(&base, "/chat/completions", &request.to_string());
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], expected.as_str());
    assert!(["stop", "length"].contains(&v["choices"][0]["finish_reason"].as_str().unwrap()));
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 0);

    // The same, streamed as server-sent events.
    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    let (status, body) = post(&base, "/chat/completions", &streamed.to_string());
    assert_eq!(status, 200, "{body}");
    let events: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{body}");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, expected);
    assert!(
        chunks.len() > 3,
        "tokens arrive as they come: {} chunks",
        chunks.len()
    );
    assert!(
        chunks.last().unwrap()["choices"][0]["finish_reason"].is_string(),
        "{body}"
    );

    // A text completion: the text of `commons run` without the chat template.
    let expected = reference(home.path(), "The capital of France is", false, 8);
    let (status, body) = post(
        &base,
        "/completions",
        &json!({ "model": name, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0 })
            .to_string(),
    );
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], expected.as_str());

    // Errors, in OpenAI's format.
    let (status, body) = post(
        &base,
        "/chat/completions",
        &json!({ "model": "no-such-model", "messages": [{ "role": "user", "content": "hi" }] })
            .to_string(),
    );
    assert_eq!(status, 404);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], "model_not_found");
    assert!(v["error"]["message"].is_string());
    let (status, body) = post(&base, "/chat/completions", "{\"model\": ");
    assert_eq!(status, 400);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    let (status, _) = post(
        &base,
        "/chat/completions",
        &json!({ "model": name, "messages": [{ "role": "user", "content": "hi" }], "temperature": 7 })
            .to_string(),
    );
    assert_eq!(status, 400);
}
