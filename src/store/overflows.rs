//! Overflow forensics rows (which gradients overflowed at which step and scale, the traced
//! activation, sampled f16 underflow) and their summary by tensor and layer for
//! `GET /api/jobs/{id}/overflows`.

use super::{fence, on_pool, Lease, Store, StoreResult};
use serde::Serialize;
use std::collections::{BTreeMap, HashSet};

/// One non-finite parameter gradient of an overflowing step.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct OverflowTensorRow {
    pub tensor: String,
    pub non_finite: i64,
    pub numel: i64,
    pub max_finite: Option<f64>,
}

/// One overflowing step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OverflowEventRow {
    pub step: i64,
    pub epoch: i64,
    pub loss_scale: Option<f64>,
    pub loss_finite: bool,
    pub activation: Option<String>,
    pub activation_max: Option<f64>,
    pub tensors: Vec<OverflowTensorRow>,
}

#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct UnderflowRow {
    pub step: i64,
    pub loss_scale: Option<f64>,
    pub n_values: i64,
    pub zero_share: f64,
    pub underflow_share: f64,
}

/// One automatic recovery from a collapsed loss scale (`amp.on_scale_collapse`).
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct RecoveryRow {
    /// The step at which the scale was found collapsed.
    pub step: i64,
    /// `bf16` or `rollback`.
    pub action: String,
    /// The checkpoint step the run went back to (0: the initial weights).
    pub resumed_from_step: i64,
    /// The precision from there on.
    pub precision: String,
    /// The base learning rate from there on.
    pub lr: f64,
    pub reason: String,
    pub created_at: String,
}

/// How often one loss scale was in use when a tensor overflowed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScaleCount {
    pub loss_scale: Option<f64>,
    pub steps: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TensorSummary {
    pub tensor: String,
    pub layer: String,
    /// Overflowing steps in which this tensor's gradient held inf/NaN.
    pub steps: i64,
    pub non_finite_values: i64,
    /// Largest finite gradient magnitude seen on those steps.
    pub max_finite: Option<f64>,
    pub last_step: i64,
    pub scales: Vec<ScaleCount>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LayerSummary {
    pub layer: String,
    pub steps: i64,
    pub tensors: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ActivationCount {
    pub activation: String,
    pub steps: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OverflowSummary {
    pub overflow_steps: i64,
    /// Most often overflowing first.
    pub tensors: Vec<TensorSummary>,
    pub layers: Vec<LayerSummary>,
    pub activations: Vec<ActivationCount>,
}

/// The layer a parameter belongs to: `encoder.layers.3.ffn.linear_1.weight` ->
/// `encoder.layers.3`; `src_emb.weight` -> `src_emb`.
pub fn layer_of(tensor: &str) -> String {
    let parts: Vec<&str> = tensor.split('.').collect();
    if parts.len() >= 3 && parts[1] == "layers" {
        parts[..3].join(".")
    } else {
        parts[0].to_string()
    }
}

/// (step, epoch, loss_scale, loss_finite, activation, activation_max) of `overflow_events`.
type EventHead = (i64, i64, Option<f64>, bool, Option<String>, Option<f64>);
/// (tensor, loss_scale, steps, non-finite values, largest finite, last step) per tensor and scale.
type TensorScaleRow = (String, Option<f64>, i64, i64, Option<f64>, i64);

fn finite(v: Option<f64>) -> Option<f64> {
    v.filter(|x| x.is_finite())
}

impl Store {
    /// Record one overflowing step (replacing a row a resumed run writes again), while `lease`
    /// holds.
    pub async fn insert_overflow(&self, lease: &Lease, ev: &OverflowEventRow) -> StoreResult<()> {
        let job_id = lease.job_id;
        on_pool!(self, p => {
            let mut tx = p.begin().await?;
            fence!(tx, lease);
            sqlx::query("DELETE FROM overflow_tensors WHERE job_id = $1 AND step = $2")
                .bind(job_id)
                .bind(ev.step)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "INSERT INTO overflow_events (job_id, step, epoch, loss_scale, loss_finite, activation, activation_max)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (job_id, step) DO UPDATE SET epoch = excluded.epoch,
                   loss_scale = excluded.loss_scale, loss_finite = excluded.loss_finite,
                   activation = excluded.activation, activation_max = excluded.activation_max",
            )
            .bind(job_id)
            .bind(ev.step)
            .bind(ev.epoch)
            .bind(finite(ev.loss_scale))
            .bind(ev.loss_finite)
            .bind(&ev.activation)
            .bind(ev.activation_max.map(|x| if x.is_finite() { x } else { f64::MAX }))
            .execute(&mut *tx)
            .await?;
            for t in &ev.tensors {
                sqlx::query(
                    "INSERT INTO overflow_tensors (job_id, step, tensor, non_finite, numel, max_finite, loss_scale)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)",
                )
                .bind(job_id)
                .bind(ev.step)
                .bind(&t.tensor)
                .bind(t.non_finite)
                .bind(t.numel)
                .bind(finite(t.max_finite))
                .bind(finite(ev.loss_scale))
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
        });
        Ok(())
    }

    pub async fn insert_underflow(&self, lease: &Lease, u: &UnderflowRow) -> StoreResult<()> {
        on_pool!(self, p => {
            let mut tx = p.begin().await?;
            fence!(tx, lease);
            sqlx::query(
                "INSERT INTO grad_underflow (job_id, step, loss_scale, n_values, zero_share, underflow_share)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (job_id, step) DO UPDATE SET loss_scale = excluded.loss_scale,
                   n_values = excluded.n_values, zero_share = excluded.zero_share,
                   underflow_share = excluded.underflow_share",
            )
            .bind(lease.job_id)
            .bind(u.step)
            .bind(finite(u.loss_scale))
            .bind(u.n_values)
            .bind(u.zero_share)
            .bind(u.underflow_share)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
        });
        Ok(())
    }

    /// Drop forensics a resumed (or rolled back) run will write again.
    pub async fn delete_overflows_after(&self, lease: &Lease, step: i64) -> StoreResult<()> {
        on_pool!(self, p => {
            let mut tx = p.begin().await?;
            fence!(tx, lease);
            for table in ["overflow_events", "overflow_tensors", "grad_underflow"] {
                sqlx::query(&format!("DELETE FROM {table} WHERE job_id = $1 AND step > $2"))
                    .bind(lease.job_id)
                    .bind(step)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
        });
        Ok(())
    }

    pub async fn insert_recovery(&self, lease: &Lease, r: &RecoveryRow) -> StoreResult<()> {
        on_pool!(self, p => {
            let mut tx = p.begin().await?;
            fence!(tx, lease);
            sqlx::query(
                "INSERT INTO recoveries (job_id, step, action, resumed_from_step, precision, lr, reason)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(lease.job_id)
            .bind(r.step)
            .bind(&r.action)
            .bind(r.resumed_from_step)
            .bind(&r.precision)
            .bind(r.lr)
            .bind(&r.reason)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
        });
        Ok(())
    }

    /// A job's recoveries, oldest first.
    pub async fn list_recoveries(&self, job_id: i64) -> StoreResult<Vec<RecoveryRow>> {
        Ok(on_pool!(self, p => sqlx::query_as::<_, RecoveryRow>(
            "SELECT step, action, resumed_from_step, precision, lr, reason, created_at
             FROM recoveries WHERE job_id = $1 ORDER BY id",
        )
        .bind(job_id)
        .fetch_all(p)
        .await?))
    }

    /// The newest `limit` overflowing steps, newest first, with their tensors.
    pub async fn recent_overflows(
        &self,
        job_id: i64,
        limit: i64,
    ) -> StoreResult<Vec<OverflowEventRow>> {
        let heads: Vec<EventHead> = on_pool!(self, p => sqlx::query_as(
            "SELECT step, epoch, loss_scale, loss_finite, activation, activation_max
                 FROM overflow_events WHERE job_id = $1 ORDER BY step DESC LIMIT $2",
        )
        .bind(job_id)
        .bind(limit)
        .fetch_all(p)
        .await?);
        let mut out = Vec::with_capacity(heads.len());
        for (step, epoch, loss_scale, loss_finite, activation, activation_max) in heads {
            let tensors = on_pool!(self, p => sqlx::query_as::<_, OverflowTensorRow>(
                "SELECT tensor, non_finite, numel, max_finite FROM overflow_tensors
                 WHERE job_id = $1 AND step = $2 ORDER BY tensor",
            )
            .bind(job_id)
            .bind(step)
            .fetch_all(p)
            .await?);
            out.push(OverflowEventRow {
                step,
                epoch,
                loss_scale,
                loss_finite,
                activation,
                activation_max,
                tensors,
            });
        }
        Ok(out)
    }

    /// The newest `limit` underflow samples, in step order.
    pub async fn list_underflow(&self, job_id: i64, limit: i64) -> StoreResult<Vec<UnderflowRow>> {
        let mut rows = on_pool!(self, p => sqlx::query_as::<_, UnderflowRow>(
            "SELECT step, loss_scale, n_values, zero_share, underflow_share FROM grad_underflow
             WHERE job_id = $1 ORDER BY step DESC LIMIT $2",
        )
        .bind(job_id)
        .bind(limit)
        .fetch_all(p)
        .await?);
        rows.reverse();
        Ok(rows)
    }

    /// Which tensors and layers overflow, how often and at which scales; which activations
    /// were traced first beyond f16.
    pub async fn overflow_summary(&self, job_id: i64) -> StoreResult<OverflowSummary> {
        let overflow_steps: i64 = on_pool!(self, p => sqlx::query_scalar(
            "SELECT COUNT(*) FROM overflow_events WHERE job_id = $1",
        )
        .bind(job_id)
        .fetch_one(p)
        .await?);
        // (PostgreSQL's SUM of BIGINT is NUMERIC: cast back)
        let rows: Vec<TensorScaleRow> = on_pool!(self, p => sqlx::query_as(
            "SELECT tensor, loss_scale, COUNT(*), CAST(SUM(non_finite) AS BIGINT), MAX(max_finite),
                    MAX(step)
             FROM overflow_tensors WHERE job_id = $1 GROUP BY tensor, loss_scale",
        )
        .bind(job_id)
        .fetch_all(p)
        .await?);
        let mut by_tensor: BTreeMap<String, TensorSummary> = BTreeMap::new();
        for (tensor, scale, steps, values, max_finite, last) in rows {
            let t = by_tensor
                .entry(tensor.clone())
                .or_insert_with(|| TensorSummary {
                    layer: layer_of(&tensor),
                    tensor,
                    steps: 0,
                    non_finite_values: 0,
                    max_finite: None,
                    last_step: 0,
                    scales: Vec::new(),
                });
            t.steps += steps;
            t.non_finite_values += values;
            t.max_finite = match (t.max_finite, max_finite) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            };
            t.last_step = t.last_step.max(last);
            t.scales.push(ScaleCount {
                loss_scale: scale,
                steps,
            });
        }
        let mut tensors: Vec<TensorSummary> = by_tensor.into_values().collect();
        for t in &mut tensors {
            t.scales.sort_by(|a, b| {
                b.loss_scale
                    .partial_cmp(&a.loss_scale)
                    .unwrap_or(std::cmp::Ordering::Equal)
            });
        }
        tensors.sort_by(|a, b| b.steps.cmp(&a.steps).then(a.tensor.cmp(&b.tensor)));

        // A layer overflowed on a step when any of its tensors did.
        let pairs: Vec<(i64, String)> = on_pool!(self, p => sqlx::query_as(
            "SELECT step, tensor FROM overflow_tensors WHERE job_id = $1",
        )
        .bind(job_id)
        .fetch_all(p)
        .await?);
        let mut layers: BTreeMap<String, (HashSet<i64>, Vec<String>)> = BTreeMap::new();
        for (step, tensor) in pairs {
            let e = layers.entry(layer_of(&tensor)).or_default();
            e.0.insert(step);
            if !e.1.contains(&tensor) {
                e.1.push(tensor);
            }
        }
        let mut layers: Vec<LayerSummary> = layers
            .into_iter()
            .map(|(layer, (steps, mut tensors))| {
                tensors.sort();
                LayerSummary {
                    layer,
                    steps: steps.len() as i64,
                    tensors,
                }
            })
            .collect();
        layers.sort_by(|a, b| b.steps.cmp(&a.steps).then(a.layer.cmp(&b.layer)));

        let activations: Vec<(String, i64)> = on_pool!(self, p => sqlx::query_as(
            "SELECT activation, COUNT(*) FROM overflow_events
             WHERE job_id = $1 AND activation IS NOT NULL GROUP BY activation
             ORDER BY COUNT(*) DESC, activation",
        )
        .bind(job_id)
        .fetch_all(p)
        .await?);
        Ok(OverflowSummary {
            overflow_steps,
            tensors,
            layers,
            activations: activations
                .into_iter()
                .map(|(activation, steps)| ActivationCount { activation, steps })
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::NewJob;

    fn ev(step: i64, scale: f64, tensors: &[&str]) -> OverflowEventRow {
        OverflowEventRow {
            step,
            epoch: 0,
            loss_scale: Some(scale),
            loss_finite: true,
            activation: (step == 2).then(|| "decoder.proj".to_string()),
            activation_max: (step == 2).then_some(f64::INFINITY),
            tensors: tensors
                .iter()
                .map(|t| OverflowTensorRow {
                    tensor: t.to_string(),
                    non_finite: 3,
                    numel: 10,
                    max_finite: Some(step as f64),
                })
                .collect(),
        }
    }

    #[test]
    fn layer_of_keeps_the_stack_and_index() {
        assert_eq!(
            layer_of("encoder.layers.3.ffn.linear_1.weight"),
            "encoder.layers.3"
        );
        assert_eq!(layer_of("src_emb.weight"), "src_emb");
    }

    #[tokio::test]
    async fn summary_counts_steps_per_tensor_scale_and_layer() {
        for t in crate::store::testing::engines().await {
            summary_on(&t.store).await;
        }
    }

    async fn summary_on(s: &Store) {
        let job = s
            .insert_job(&NewJob {
                name: "o".into(),
                priority: 0,
                spec: crate::config::TrainSpec::default(),
                requires_device: None,
            })
            .await
            .unwrap()
            .id;
        let lease = crate::store::testing::adopt(s, job, "n1").await.unwrap();
        let a = "decoder.layers.0.ffn.linear_1.weight";
        let b = "decoder.layers.0.ffn.linear_2.weight";
        s.insert_overflow(&lease, &ev(1, 1024.0, &[a, b]))
            .await
            .unwrap();
        s.insert_overflow(&lease, &ev(2, 512.0, &[a]))
            .await
            .unwrap();
        s.insert_overflow(&lease, &ev(3, 512.0, &[a]))
            .await
            .unwrap();
        let sum = s.overflow_summary(job).await.unwrap();
        assert_eq!(sum.overflow_steps, 3);
        assert_eq!(sum.tensors[0].tensor, a);
        assert_eq!(
            (
                sum.tensors[0].steps,
                sum.tensors[0].non_finite_values,
                sum.tensors[0].last_step
            ),
            (3, 9, 3)
        );
        assert_eq!(sum.tensors[0].max_finite, Some(3.0));
        assert_eq!(
            sum.tensors[0].scales,
            [
                ScaleCount {
                    loss_scale: Some(1024.0),
                    steps: 1
                },
                ScaleCount {
                    loss_scale: Some(512.0),
                    steps: 2
                }
            ]
        );
        assert_eq!(sum.tensors[1].steps, 1);
        assert_eq!(sum.layers.len(), 1);
        assert_eq!((sum.layers[0].steps, sum.layers[0].tensors.len()), (3, 2));
        assert_eq!(
            sum.activations,
            [ActivationCount {
                activation: "decoder.proj".into(),
                steps: 1
            }]
        );
        let recent = s.recent_overflows(job, 2).await.unwrap();
        assert_eq!(recent.iter().map(|e| e.step).collect::<Vec<_>>(), [3, 2]);
        // a resumed run rewrites what came after its checkpoint
        s.delete_overflows_after(&lease, 1).await.unwrap();
        assert_eq!(s.overflow_summary(job).await.unwrap().overflow_steps, 1);
    }
}
