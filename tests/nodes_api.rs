//! `GET /api/nodes` and a job's `"device"` requirement, on one server (SQLite): the node lists
//! itself with its devices and running jobs, a job that needs CUDA waits on a CPU-only node
//! while later CPU jobs run, and an unknown device kind is refused naming the field.

mod common;

use common::{args_for, fake_job, FakeTrainer, TestServer};
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_lists_itself_with_its_devices_and_the_job_it_runs() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeTrainer::held_after(5);
    let srv = TestServer::start(args_for(dir.path()), fake.clone()).await;
    let id = srv.submit(&fake_job("listed")).await;
    let running = srv
        .wait_job(id, "step 5", |j| j["progress"]["step"] == 5)
        .await;
    let (s, v) = srv.get("/api/nodes").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let nodes = v["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 1, "{v}");
    let me = &nodes[0];
    let node_id = std::fs::read_to_string(dir.path().join("node-id")).unwrap();
    assert_eq!(
        me["id"],
        node_id.trim(),
        "the id kept in the data directory"
    );
    assert_eq!(me["devices"], json!(["cpu"]));
    assert_eq!(
        (me["alive"].as_bool(), me["this_node"].as_bool()),
        (Some(true), Some(true))
    );
    assert_eq!(me["jobs"], json!([id]));
    assert_eq!(
        running["node"], me["id"],
        "the job names the node running it"
    );
    assert_eq!(v["lease_timeout_s"], 30.0);
    fake.release();
    let done = srv.wait_status(id, "succeeded").await;
    assert_eq!(done["node"], me["id"], "and keeps it once it ended");
    let (_, v) = srv.get("/api/nodes").await;
    assert_eq!(v["nodes"][0]["jobs"], json!([]));
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_needs_cuda_waits_on_a_cpu_node_and_an_unknown_kind_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(args_for(dir.path()), FakeTrainer::new()).await;
    let mut body = fake_job("tpu");
    body["device"] = json!("tpu");
    let (s, v) = srv.post("/api/jobs", &body).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["error"]["field"], "device", "{v}");
    body["device"] = json!(3);
    let (s, v) = srv.post("/api/jobs", &body).await;
    assert_eq!(
        (s, &v["error"]["field"]),
        (StatusCode::UNPROCESSABLE_ENTITY, &json!("device"))
    );

    let mut gpu = fake_job("gpu");
    gpu["device"] = json!("cuda");
    let gpu_id = srv.submit(&gpu).await;
    let mut cpu = fake_job("cpu");
    cpu["device"] = json!("cpu");
    let cpu_id = srv.submit(&cpu).await;
    let done = srv.wait_status(cpu_id, "succeeded").await;
    assert_eq!(done["requires_device"], "cpu");
    // older and as urgent, but no device of its kind here
    let waiting = srv.job(gpu_id).await;
    assert_eq!(waiting["status"], "queued", "{waiting}");
    assert_eq!(waiting["requires_device"], "cuda");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_on_one_sqlite_file_see_each_others_jobs_live() {
    let db = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", db.path().join("shared.db").display());
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let fakes = [FakeTrainer::held_after(5), FakeTrainer::held_after(5)];
    let mut servers = Vec::new();
    for (d, f) in dirs.iter().zip(&fakes) {
        let mut args = args_for(d.path());
        args.database_url = Some(url.clone());
        servers.push(TestServer::start(args, f.clone()).await);
    }
    let id = servers[0].submit(&fake_job("shared")).await;
    let running = servers[0]
        .wait_job(id, "step 5", |j| j["progress"]["step"] == 5)
        .await;
    let runner_id = running["node"].as_str().unwrap().to_string();
    let ids: Vec<String> = dirs
        .iter()
        .map(|d| std::fs::read_to_string(d.path().join("node-id")).unwrap())
        .collect();
    let other = ids.iter().position(|i| i.trim() != runner_id).unwrap();
    // the other node follows the job (its poller reads the shared file)
    let stream = servers[other].events(id).await;
    for f in &fakes {
        f.release();
    }
    let events = common::read_sse(stream).await;
    let steps: Vec<i64> = events
        .iter()
        .filter(|(n, _)| n == "step")
        .map(|(_, v)| v["step"].as_i64().unwrap())
        .collect();
    assert!(!steps.is_empty(), "{events:?}");
    assert!(steps.windows(2).all(|w| w[0] < w[1]), "{steps:?}");
    let last = events.last().unwrap();
    assert_eq!(
        (last.0.as_str(), &last.1["status"]),
        ("status", &json!("succeeded"))
    );
    for s in servers {
        s.stop().await;
    }
}
