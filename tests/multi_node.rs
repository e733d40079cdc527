//! Three `ampserve serve` processes (the real binary) on one PostgreSQL database and one
//! S3-compatible store (moto), as `scripts/services.sh` starts them: six tiny jobs, the node
//! running the longest one is SIGKILLed mid-training, and then: the job is taken over once its
//! lease expires and resumes from its latest checkpoint, every job succeeds exactly once with
//! exactly one metric row per step, every node that ran a job fetched the corpus uploaded to
//! one node, every node (the killed one restarted too) lists and serves every exported
//! model, and a fork asked of a node that did not run its parent retraces the parent. Skipped with a note without the servers, unless
//! AMPSERVE_REQUIRE_POSTGRES=1 (CI), where that is a failure.

mod common;

use common::{metric_steps, spawn_bin_server, tiny_real_job, BinServer};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const LEASE_S: &str = "3";

fn s3_prefix() -> Option<String> {
    match std::env::var("AMPSERVE_TEST_S3_ENDPOINT") {
        Ok(_) => Some(format!(
            "s3://ampserve/multi-{}-{}",
            std::process::id(),
            ampserve::store::unix_ms()
        )),
        Err(_) if std::env::var("AMPSERVE_REQUIRE_POSTGRES").as_deref() == Ok("1") => {
            panic!("AMPSERVE_REQUIRE_POSTGRES=1 but AMPSERVE_TEST_S3_ENDPOINT is unset")
        }
        Err(_) => None,
    }
}

fn node(dir: &std::path::Path, id: &str, db: &str, artifacts: &str) -> BinServer {
    spawn_bin_server(
        dir,
        &[
            "--database-url",
            db,
            "--artifact-store",
            artifacts,
            "--lease-timeout",
            LEASE_S,
            "--node-id",
            id,
        ],
    )
}

async fn job(c: &reqwest::Client, n: &BinServer, id: i64) -> Value {
    n.get(c, &format!("/api/jobs/{id}")).await
}

/// Poll `n` until `pred(job)`; the deadline only keeps a broken run from hanging.
async fn wait_job(
    c: &reqwest::Client,
    n: &BinServer,
    id: i64,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let j = job(c, n, id).await;
        if pred(&j) {
            return j;
        }
        assert!(
            Instant::now() < deadline,
            "job {id} never reached {what}: {j}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_share_one_queue_survive_a_sigkill_and_serve_every_model() {
    let Some(db) = ampserve::store::testing::fresh_postgres_url()
        .await
        .unwrap()
    else {
        return;
    };
    let Some(artifacts) = s3_prefix() else {
        eprintln!("note: AMPSERVE_TEST_S3_ENDPOINT is unset: skipped");
        return;
    };
    let c = reqwest::Client::new();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut nodes: Vec<Option<BinServer>> = dirs
        .iter()
        .enumerate()
        .map(|(i, d)| Some(node(d.path(), &format!("node-{i}"), &db, &artifacts)))
        .collect();

    // Every job trains on a corpus uploaded to node 0 only: the other nodes fetch it from the
    // artifact store (and check its sha256) when they run one.
    let corpus_text: String = std::fs::read_to_string("data/tatoeba-en-it/train.en-it.tsv")
        .unwrap()
        .lines()
        .take(400)
        .map(|l| format!("{l}\n"))
        .collect();
    let r = c
        .post(format!(
            "{}/api/corpora?name=multi&src_lang=en&tgt_lang=it",
            nodes[0].as_ref().unwrap().base
        ))
        .body(corpus_text.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let corpus: Value = r.json().await.unwrap();
    let corpus_file = std::path::Path::new(corpus["corpus"]["path"].as_str().unwrap())
        .file_name()
        .unwrap()
        .to_owned();

    // One long job (the one a node dies under) and five short ones, submitted across nodes.
    let long_steps = 300;
    let mut ids = Vec::new();
    let mut steps = Vec::new();
    for i in 0..6 {
        let (n, every) = if i == 0 { (long_steps, 20) } else { (40, 20) };
        let mut body = tiny_real_job(&format!("multi-{i}"), n, every);
        body["data"]["train"] = json!(corpus_file.to_str().unwrap());
        if i == 1 {
            // the fork below starts at this job's step-20 checkpoint: keep it
            body["checkpoint"]["keep_last"] = json!(10);
        }
        let (s, v) = nodes[i % 3]
            .as_ref()
            .unwrap()
            .post(&c, "/api/jobs", &body)
            .await;
        assert_eq!(s, 201, "{v}");
        ids.push(v["id"].as_i64().unwrap());
        steps.push(n as i64);
    }
    let long = ids[0];

    // Every node streams the last job's events, whichever node runs it (LISTEN/NOTIFY).
    let followed = ids[5];
    let streams: Vec<_> = nodes
        .iter()
        .map(|n| {
            let url = format!("{}/api/jobs/{followed}/events", n.as_ref().unwrap().base);
            tokio::spawn(sse_names(url))
        })
        .collect();

    // The long job has a checkpoint in the store and is still well short of its end: kill the
    // node running it.
    let any = nodes[0].as_ref().unwrap();
    let running = wait_job(&c, any, long, "a checkpoint", |j| {
        j["status"] == "running" && j["progress"]["step"].as_i64().unwrap_or(0) >= 60
    })
    .await;
    let victim_id = running["node"].as_str().unwrap().to_string();
    let victim = victim_id
        .trim_start_matches("node-")
        .parse::<usize>()
        .unwrap();
    let ckpts: Vec<Value> = any.get(&c, &format!("/api/jobs/{long}/checkpoints")).await
        ["checkpoints"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let last_ckpt = ckpts
        .iter()
        .filter_map(|k| k["step"].as_i64())
        .max()
        .unwrap_or(0);
    assert!(last_ckpt >= 20, "a checkpoint before the kill: {ckpts:?}");
    nodes[victim].take().unwrap().kill();
    let killed_at = Instant::now();
    // a surviving node watches
    let w = (victim + 1) % 3;

    // Taken over after the lease timeout, resumed from a checkpoint the store had at the kill.
    let resumed = wait_job(&c, nodes[w].as_ref().unwrap(), long, "a takeover", |j| {
        j["node"].as_str() != Some(victim_id.as_str())
            && j["progress"]["resumed_from_step"].as_i64().unwrap_or(0) > 0
    })
    .await;
    eprintln!(
        "takeover: {:.2} s from SIGKILL to the job resumed at step {} on {} (lease timeout {LEASE_S} s)",
        killed_at.elapsed().as_secs_f64(),
        resumed["progress"]["resumed_from_step"],
        resumed["node"]
    );
    assert!(
        resumed["progress"]["resumed_from_step"].as_i64().unwrap() >= last_ckpt,
        "lost more than the steps since the last checkpoint: {resumed}"
    );

    // The killed node comes back (same data directory, same id) and joins in.
    nodes[victim] = Some(node(dirs[victim].path(), &victim_id, &db, &artifacts));

    // Every job succeeds exactly once, with one metric row per step.
    for (&id, &n) in ids.iter().zip(&steps) {
        let watcher = nodes[w].as_ref().unwrap();
        let j = wait_job(&c, watcher, id, "succeeded", |j| {
            j["status"] == "succeeded" || j["status"] == "failed"
        })
        .await;
        assert_eq!(j["status"], "succeeded", "{j}");
        let expected_attempts = if id == long { 2 } else { 1 };
        assert_eq!(j["attempts"], expected_attempts, "{j}");
        let points = watcher
            .get(&c, &format!("/api/jobs/{id}/metrics?limit=100000"))
            .await;
        assert_eq!(
            metric_steps(&points),
            (1..=n).collect::<Vec<_>>(),
            "job {id}"
        );
    }

    // Each node that ran a job has its own copy of the uploaded corpus, as node 0 took it.
    for id in &ids {
        let ran_on = job(&c, nodes[w].as_ref().unwrap(), *id).await["node"]
            .as_str()
            .unwrap()
            .trim_start_matches("node-")
            .parse::<usize>()
            .unwrap();
        let copy = dirs[ran_on].path().join("corpora").join(&corpus_file);
        assert_eq!(
            std::fs::read_to_string(&copy).unwrap(),
            corpus_text,
            "job {id} ran on node-{ran_on}"
        );
    }

    // Every node lists every exported model and translates with each.
    let watcher = nodes[w].as_ref().unwrap();
    let wait_models = Instant::now() + Duration::from_secs(120);
    let models = loop {
        let m = watcher.get(&c, "/api/models").await["models"].clone();
        if m.as_array().unwrap().len() >= ids.len() || Instant::now() > wait_models {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let model_ids: Vec<i64> = models
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_i64().unwrap())
        .collect();
    let mut jobs_of_models: Vec<i64> = models
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["job_id"].as_i64().unwrap())
        .collect();
    jobs_of_models.sort_unstable();
    assert_eq!(jobs_of_models, ids, "one model per job");
    for n in nodes.iter().flatten() {
        let listed = n.get(&c, "/api/models").await["models"]
            .as_array()
            .unwrap()
            .len();
        assert_eq!(listed, ids.len(), "{}", n.base);
        for &m in &model_ids {
            let (s, v) = n
                .post(
                    &c,
                    "/api/translate",
                    &json!({"model": m, "text": "I like the cat."}),
                )
                .await;
            assert_eq!(s, 200, "model {m} on {}: {v}", n.base);
            assert!(v["translations"][0]["text"].is_string(), "{v}");
        }
    }
    // The surviving nodes' streams saw the followed job's steps and its end, relayed from
    // the node that ran it (the killed node's stream broke with it).
    let runner = job(&c, nodes[w].as_ref().unwrap(), followed).await["node"].clone();
    for (i, st) in streams.into_iter().enumerate() {
        let names = st.await.unwrap();
        if i == victim {
            continue;
        }
        assert!(
            names.iter().any(|n| n == "step"),
            "node-{i} (runner {runner}): {names:?}"
        );
        assert_eq!(
            names.last().map(String::as_str),
            Some("status:succeeded"),
            "node-{i} (runner {runner}): {names:?}"
        );
    }
    let listed = nodes[0].as_ref().unwrap().get(&c, "/api/nodes").await;
    assert_eq!(listed["nodes"].as_array().unwrap().len(), 3, "{listed}");

    // A fork asked of a node that did not run the parent: staged from the parent's checkpoint
    // as the artifact store has it, and run by whichever node claims it (through the store).
    let parent = ids[1];
    let parent_node = job(&c, nodes[w].as_ref().unwrap(), parent).await["node"]
        .as_str()
        .unwrap()
        .trim_start_matches("node-")
        .parse::<usize>()
        .unwrap();
    let asked = nodes[(parent_node + 1) % 3].as_ref().unwrap();
    let (s, fork) = asked
        .post(
            &c,
            &format!("/api/jobs/{parent}/fork"),
            &json!({"checkpoint": 20}),
        )
        .await;
    assert_eq!(s, 201, "{fork}");
    let fork_id = fork["id"].as_i64().unwrap();
    let done = wait_job(&c, asked, fork_id, "an end", |j| {
        j["status"] == "succeeded" || j["status"] == "failed"
    })
    .await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["progress"]["resumed_from_step"], 20, "{done}");
    let losses = |v: &Value| -> Vec<(i64, f64)> {
        v["points"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p["step"].as_i64().unwrap(), p["loss"].as_f64().unwrap()))
            .collect()
    };
    let fork_losses = losses(
        &asked
            .get(&c, &format!("/api/jobs/{fork_id}/metrics?limit=100000"))
            .await,
    );
    let parent_losses = losses(
        &asked
            .get(&c, &format!("/api/jobs/{parent}/metrics?limit=100000"))
            .await,
    );
    assert_eq!(
        fork_losses.iter().map(|p| p.0).collect::<Vec<_>>(),
        (21..=40).collect::<Vec<_>>()
    );
    // the parent's weights, optimizer state and data position: it retraces the parent
    for (f, p) in fork_losses.iter().zip(&parent_losses[20..]) {
        assert!(
            (f.1 - p.1).abs() < 1e-3 * p.1.abs().max(1.0),
            "step {}: fork {} parent {}",
            f.0,
            f.1,
            p.1
        );
    }
    for n in nodes.into_iter().flatten() {
        n.kill();
    }
}

/// The event names of an SSE stream until it ends or breaks (`status:<status>` for status
/// events).
async fn sse_names(url: String) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(mut r) = reqwest::get(&url).await else {
        return out;
    };
    let mut buf = String::new();
    while let Ok(Some(chunk)) = r.chunk().await {
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let name = block
                .lines()
                .find_map(|l| l.strip_prefix("event:").map(str::trim));
            let data = block
                .lines()
                .find_map(|l| l.strip_prefix("data:").map(str::trim));
            match (name, data) {
                (Some("status"), Some(d)) => {
                    let v: Value = serde_json::from_str(d).unwrap_or(Value::Null);
                    out.push(format!("status:{}", v["status"].as_str().unwrap_or("?")));
                }
                (Some(n), _) => out.push(n.to_string()),
                _ => {}
            }
        }
    }
    out
}
