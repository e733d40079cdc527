//! Claims with leases on both engines (SQLite always; PostgreSQL when AMPSERVE_TEST_DATABASE_URL
//! names a server, required in CI): takeover after a lease expires, the write guard of a node
//! that lost its lease, heartbeats, device requirements, and racing claimers on several nodes
//! never sharing a job. And one server whose job is taken over mid-run: it stops the job and
//! writes nothing more for it.

mod common;

use ampserve::config::TrainSpec;
use ampserve::store::leases::Claim;
use ampserve::store::nodes::DeviceKind;
use ampserve::store::testing;
use ampserve::store::{unix_ms, JobStatus, Lease, MetricRow, NewJob, Store, StoreError};
use common::{args_for, fake_job, FakeTrainer, TestServer};
use std::collections::HashMap;
use std::time::{Duration, Instant};

fn claim(node: &str) -> Claim<'_> {
    Claim {
        node,
        worker: "worker-0",
        device: "cpu",
        kind: DeviceKind::Cpu,
        lease_ms: 60_000,
        max_attempts: 3,
    }
}

async fn add(s: &Store, name: &str, device: Option<DeviceKind>) -> i64 {
    s.insert_job(&NewJob {
        name: name.into(),
        priority: 0,
        spec: TrainSpec::default(),
        requires_device: device,
    })
    .await
    .unwrap()
    .id
}

fn row(step: i64) -> MetricRow {
    MetricRow {
        step,
        epoch: 1,
        loss: Some(1.0),
        lr: Some(1e-3),
        loss_scale: Some(1024.0),
        found_inf: false,
        skipped: false,
        grad_norm: Some(0.5),
        tokens_per_s: Some(10.0),
        step_ms: Some(1.0),
    }
}

#[tokio::test]
async fn a_job_whose_owner_stopped_renewing_is_taken_over_once_its_lease_has_expired() {
    for t in testing::engines().await {
        let s = &t.store;
        let id = add(s, "j", None).await;
        let a = s.claim_next_job(&claim("node-a")).await.unwrap().unwrap();
        assert_eq!((a.id, a.owner.as_deref()), (id, Some("node-a")));
        // the lease holds: nothing for node b
        assert!(s.claim_next_job(&claim("node-b")).await.unwrap().is_none());
        // node a went quiet long enough (it does not take its own job over again)
        assert_eq!(s.set_lease_expiry(id, unix_ms() - 1).await.unwrap(), 1);
        assert!(s.claim_next_job(&claim("node-a")).await.unwrap().is_none());
        let b = s.claim_next_job(&claim("node-b")).await.unwrap().unwrap();
        assert_eq!(b.id, id, "{}", s.engine());
        assert_eq!(b.owner.as_deref(), Some("node-b"));
        assert_eq!(b.status(), JobStatus::Running);
        assert_eq!((b.attempts, b.crashes), (2, 1), "a takeover counts a crash");
        assert!(b.lease_expires_at.unwrap() > unix_ms());
    }
}

#[tokio::test]
async fn a_job_that_took_down_max_attempts_nodes_is_failed_instead_of_taken_over_again() {
    for t in testing::engines().await {
        let s = &t.store;
        let id = add(s, "killer", None).await;
        // node a claims it and dies; b takes it over and dies (crash 1); c the same (crash 2)
        for node in ["node-a", "node-b", "node-c"] {
            assert!(s
                .fail_abandoned_crash_loops(node, 3)
                .await
                .unwrap()
                .is_empty());
            let j = s.claim_next_job(&claim(node)).await.unwrap().unwrap();
            assert_eq!(j.id, id, "{}", s.engine());
            assert_eq!(s.set_lease_expiry(id, unix_ms() - 1).await.unwrap(), 1);
        }
        assert_eq!(s.get_job(id).await.unwrap().unwrap().crashes, 2);
        // its owner itself does not fail its own job (a late heartbeat is not a crash)
        assert!(s
            .fail_abandoned_crash_loops("node-c", 3)
            .await
            .unwrap()
            .is_empty());
        // a third takeover would be its third crash: --max-attempts 3 ends it here
        assert!(
            s.claim_next_job(&claim("node-d")).await.unwrap().is_none(),
            "{}: not claimable",
            s.engine()
        );
        assert_eq!(
            s.fail_abandoned_crash_loops("node-d", 3).await.unwrap(),
            [(id, 3)]
        );
        let j = s.get_job(id).await.unwrap().unwrap();
        assert_eq!(j.status(), JobStatus::Failed);
        assert_eq!((j.owner, j.lease_expires_at), (None, None));
        let error = j.error.unwrap();
        assert!(
            error.contains("crashed 3 times")
                && error.contains("node-c")
                && error.contains("--max-attempts 3"),
            "{error}"
        );
        // node c, back from the dead, finds its lease gone
        let lost = s
            .insert_metrics(&Lease::new(id, "node-c"), &[row(1)])
            .await
            .unwrap_err();
        assert!(matches!(lost, StoreError::LeaseLost { .. }), "{lost}");
    }
}

#[tokio::test]
async fn a_node_that_lost_its_lease_writes_nothing_more_for_the_job() {
    for t in testing::engines().await {
        let s = &t.store;
        let id = add(s, "j", None).await;
        s.claim_next_job(&claim("node-a")).await.unwrap().unwrap();
        let a = Lease::new(id, "node-a");
        s.insert_metrics(&a, &[row(1), row(2)]).await.unwrap();
        s.set_lease_expiry(id, unix_ms() - 1).await.unwrap();
        s.claim_next_job(&claim("node-b")).await.unwrap().unwrap();
        let b = Lease::new(id, "node-b");

        let lost = s.insert_metrics(&a, &[row(3)]).await.unwrap_err();
        assert!(
            matches!(lost, StoreError::LeaseLost { job_id } if job_id == id),
            "{}: {lost}",
            s.engine()
        );
        assert!(s
            .delete_metrics_after(&a, 0)
            .await
            .unwrap_err()
            .is_lease_lost());
        assert!(s
            .set_job_progress(&a, &Default::default())
            .await
            .unwrap_err()
            .is_lease_lost());
        assert!(!s.finish_job(&a, JobStatus::Succeeded, None).await.unwrap());
        assert_eq!(
            s.count_metrics(id, 0).await.unwrap(),
            2,
            "a's late row is not there"
        );

        // the new owner resumes after step 1 and writes its own rows
        s.delete_metrics_after(&b, 1).await.unwrap();
        s.insert_metrics(&b, &[row(2), row(3)]).await.unwrap();
        let steps: Vec<i64> = s
            .list_metrics(id, 0, None)
            .await
            .unwrap()
            .iter()
            .map(|r| r.step)
            .collect();
        assert_eq!(steps, [1, 2, 3]);
        assert!(s.finish_job(&b, JobStatus::Succeeded, None).await.unwrap());
    }
}

#[tokio::test]
async fn a_heartbeat_renews_only_its_own_nodes_leases_and_ends_the_cancels_of_dead_nodes() {
    for t in testing::engines().await {
        let s = &t.store;
        let mine = add(s, "mine", None).await;
        s.claim_next_job(&claim("node-a")).await.unwrap().unwrap();
        let theirs = add(s, "theirs", None).await;
        s.claim_next_job(&claim("node-b")).await.unwrap().unwrap();
        s.set_lease_expiry(mine, 1).await.unwrap();
        s.set_lease_expiry(theirs, 1).await.unwrap();
        assert!(s.mark_job_cancelling(theirs).await.unwrap());

        let r = s.renew_leases("node-a", 60_000).await.unwrap();
        assert_eq!(r.owned, [(mine, "running".to_string())], "{}", s.engine());
        assert_eq!(r.cancelled, [theirs], "node b died while cancelling");
        assert!(
            s.get_job(mine)
                .await
                .unwrap()
                .unwrap()
                .lease_expires_at
                .unwrap()
                > unix_ms()
        );
        let j = s.get_job(theirs).await.unwrap().unwrap();
        assert_eq!(j.status(), JobStatus::Cancelled);
        assert!(j.finished_at.is_some());
    }
}

#[tokio::test]
async fn a_job_that_needs_cuda_waits_for_a_node_with_cuda() {
    for t in testing::engines().await {
        let s = &t.store;
        let gpu_job = add(s, "gpu", Some(DeviceKind::Cuda)).await;
        let any_job = add(s, "any", None).await;
        let cpu_job = add(s, "cpu", Some(DeviceKind::Cpu)).await;
        assert_eq!(
            s.claim_next_job(&claim("c")).await.unwrap().unwrap().id,
            any_job
        );
        assert_eq!(
            s.claim_next_job(&claim("c")).await.unwrap().unwrap().id,
            cpu_job
        );
        assert!(
            s.claim_next_job(&claim("c")).await.unwrap().is_none(),
            "{}",
            s.engine()
        );
        let gpu = Claim {
            device: "cuda:0",
            kind: DeviceKind::Cuda,
            ..claim("g")
        };
        assert_eq!(s.claim_next_job(&gpu).await.unwrap().unwrap().id, gpu_job);
    }
}

/// `jobs` queued, then `nodes` nodes with `per_node` claimers each (one pool per node, as
/// separate processes have) claim until the queue is empty. Returns (claims per job, seconds).
async fn race(
    t: &testing::TestStore,
    nodes: usize,
    per_node: usize,
    jobs: usize,
) -> (HashMap<i64, usize>, f64) {
    for i in 0..jobs {
        add(&t.store, &format!("j{i}"), None).await;
    }
    let mut stores = Vec::new();
    for _ in 0..nodes {
        stores.push(if t.url.starts_with("postgres") {
            Store::connect(&t.url).await.unwrap()
        } else {
            t.store.clone()
        });
    }
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for (n, s) in stores.iter().enumerate() {
        for _ in 0..per_node {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                let node = format!("node-{n}");
                let mut got = Vec::new();
                while let Some(j) = s.claim_next_job(&claim(&node)).await.unwrap() {
                    got.push(j.id);
                }
                got
            }));
        }
    }
    let mut claims: HashMap<i64, usize> = HashMap::new();
    for task in tasks {
        for id in task.await.unwrap() {
            *claims.entry(id).or_default() += 1;
        }
    }
    (claims, t0.elapsed().as_secs_f64())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_claimers_on_three_nodes_claim_every_job_exactly_once() {
    for t in testing::engines().await {
        let (claims, _) = race(&t, 3, 3, 60).await;
        assert_eq!(claims.len(), 60, "{}: every job claimed", t.store.engine());
        assert!(claims.values().all(|&n| n == 1), "{claims:?}");
    }
}

/// The claim throughput the README quotes (jobs claimed per second, 3 nodes racing, none
/// twice). A measurement: `cargo test --test leases -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore]
async fn measure_claim_throughput_with_three_racing_nodes() {
    for t in testing::engines().await {
        let (claims, secs) = race(&t, 3, 1, 2000).await;
        assert!(claims.len() == 2000 && claims.values().all(|&n| n == 1));
        eprintln!(
            "{}: 2000 jobs claimed by 3 racing nodes in {secs:.2} s: {:.0} claims/s",
            t.store.engine(),
            2000.0 / secs
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_whose_job_is_taken_over_stops_it_and_writes_no_further_rows() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeTrainer::held_after(10);
    let srv = TestServer::start(args_for(dir.path()), fake.clone()).await;
    let id = srv.submit(&fake_job("stolen")).await;
    srv.wait_job(id, "10 rows", |j| j["progress"]["step"] == 10)
        .await;
    let store = Store::open(&dir.path().join("ampserve.db")).await.unwrap();
    // the flush of steps 1..=10 is what the row shows; then another node takes the job
    let rows_before = store.count_metrics(id, 0).await.unwrap();
    assert_eq!(rows_before, 10);
    store
        .execute(&format!("UPDATE jobs SET owner = 'thief' WHERE id = {id}"))
        .await
        .unwrap();
    fake.release();
    // the worker stops the run (its next guarded write fails) and goes idle
    let deadline = Instant::now() + Duration::from_secs(120);
    while !srv.app.pool.live_jobs().is_empty() {
        assert!(Instant::now() < deadline, "the run never stopped");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let j = store.get_job(id).await.unwrap().unwrap();
    assert_eq!(j.owner.as_deref(), Some("thief"));
    assert_eq!(
        j.status(),
        JobStatus::Running,
        "the thief's run, not ended by the loser"
    );
    assert_eq!(j.current_step, 10);
    assert_eq!(store.count_metrics(id, 0).await.unwrap(), rows_before);
    srv.stop().await;
}
