//! Precision experiments: one spec, several arms (precision names or small spec overrides),
//! one budget. Every arm keeps the spec's seed, data, model and batching, so the arms share
//! their initial weights and their data order and differ only in what the arm overrides. The
//! server turns each arm into a job (`POST /api/experiments`); `ampserve experiment` runs them
//! here one after another ([`local`]); [`summary`] turns the arms' step records and
//! validations into the comparison. Library code: no tokio, sqlx or axum.

pub mod local;
pub mod summary;

use crate::config::{Precision, SpecError, TrainSpec};
use crate::spec_overrides::{self, deep_merge, Allowed, Refusal};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// At most this many arms per experiment.
pub const MAX_ARMS: usize = 8;

/// What an arm may change, by spec section (`None`: any field of it). Nothing that changes the
/// model, the data, the seed or the batches.
const ARM_FIELDS: &Allowed = &[
    (
        "train",
        Some(&[
            "precision",
            "lr",
            "schedule",
            "warmup_steps",
            "clip_grad_norm",
        ]),
    ),
    ("amp", None),
];

/// One arm: a label and spec-shaped overrides.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Arm {
    pub label: String,
    pub overrides: Map<String, Value>,
}

/// The budget every arm gets (0 = none); at least one is set.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
pub struct Budget {
    pub max_steps: usize,
    pub max_time_s: f64,
}

impl Budget {
    pub fn new(max_steps: usize, max_time_s: f64) -> Result<Self, SpecError> {
        if !(max_time_s.is_finite() && (0.0..=1e8).contains(&max_time_s)) {
            return Err(SpecError::new(
                "max_time_s",
                format!("{max_time_s} is out of range; allowed 0..=100000000"),
            ));
        }
        if max_steps > 100_000_000 {
            return Err(SpecError::new(
                "max_steps",
                format!("{max_steps} is out of range; allowed 0..=100000000"),
            ));
        }
        if max_steps == 0 && max_time_s == 0.0 {
            return Err(SpecError::new(
                "max_steps",
                "an experiment needs a budget: max_steps or max_time_s (> 0)",
            ));
        }
        Ok(Self {
            max_steps,
            max_time_s,
        })
    }
}

fn label_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// Parse the `arms` array: each item a precision name (`"fp32"`, `"f16"`, `"bf16"`) or an object
/// `{"label": "f16-lr2", "train": {...}, "amp": {...}}`. Errors name `arms[i]...`.
pub fn parse_arms(v: &Value) -> Result<Vec<Arm>, SpecError> {
    let Value::Array(items) = v else {
        return Err(SpecError::new(
            "arms",
            "expected an array of precision names or override objects",
        ));
    };
    if items.is_empty() || items.len() > MAX_ARMS {
        return Err(SpecError::new(
            "arms",
            format!("{} arms; allowed 1..={MAX_ARMS}", items.len()),
        ));
    }
    let mut arms: Vec<Arm> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let at = format!("arms[{i}]");
        let arm = match item {
            Value::String(s) => {
                let p: Precision = s
                    .parse()
                    .map_err(|e: SpecError| SpecError::new(at.clone(), e.message))?;
                let mut o = Map::new();
                o.insert("train".into(), serde_json::json!({"precision": p.as_str()}));
                Arm {
                    label: p.as_str().into(),
                    overrides: o,
                }
            }
            Value::Object(obj) => {
                let mut o = obj.clone();
                let label = match o.remove("label") {
                    Some(Value::String(l)) => l,
                    None | Some(Value::Null) => o
                        .get("train")
                        .and_then(|t| t.get("precision"))
                        .and_then(|p| p.as_str())
                        .map(str::to_string)
                        .unwrap_or_else(|| format!("arm{}", i + 1)),
                    Some(_) => {
                        return Err(SpecError::new(format!("{at}.label"), "expected a string"))
                    }
                };
                check_fields(&o, &at)?;
                Arm {
                    label,
                    overrides: o,
                }
            }
            _ => {
                return Err(SpecError::new(
                    at,
                    "expected a precision name or an object of spec overrides",
                ))
            }
        };
        if !label_ok(&arm.label) {
            return Err(SpecError::new(
                format!("{at}.label"),
                "1..=32 letters, digits, '-', '_' or '.'",
            ));
        }
        if arms.iter().any(|a| a.label == arm.label) {
            return Err(SpecError::new(
                format!("{at}.label"),
                format!("`{}` is already the label of another arm", arm.label),
            ));
        }
        arms.push(arm);
    }
    Ok(arms)
}

fn check_fields(o: &Map<String, Value>, at: &str) -> Result<(), SpecError> {
    let refuse = |f: String| {
        SpecError::new(
            format!("{at}.{f}"),
            "an arm may change only train.{precision, lr, schedule, warmup_steps, \
             clip_grad_norm} and amp.*: the arms share the model, the data, the seed and the \
             batches",
        )
    };
    spec_overrides::check(o, ARM_FIELDS).map_err(|r| match r {
        Refusal::NotAllowed(f) => refuse(f),
        Refusal::NotAnObject(key) => SpecError::new(format!("{at}.{key}"), "expected an object"),
    })
}

/// The spec arm `index` runs: `base` with the arm's overrides and the budget (`max_steps`
/// replaced, 0 = no step cap; `max_time_s` likewise), named `<base>-<label>`, validated.
pub fn arm_spec(
    base: &TrainSpec,
    arm: &Arm,
    index: usize,
    budget: &Budget,
) -> Result<TrainSpec, SpecError> {
    let at = format!("arms[{index}]");
    let mut v = serde_json::to_value(base).map_err(|e| SpecError::new(&at, e.to_string()))?;
    deep_merge(&mut v, Value::Object(arm.overrides.clone()));
    let mut spec: TrainSpec =
        serde_json::from_value(v).map_err(|e| SpecError::new(&at, e.to_string()))?;
    spec.train.max_steps = budget.max_steps;
    spec.train.max_time_s = budget.max_time_s;
    let mut name = format!("{}-{}", base.name, arm.label);
    name.truncate(100);
    spec.name = name;
    spec.validate()
        .map_err(|e| SpecError::new(format!("{at}.{}", e.field), e.message))?;
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn precision_names_become_arms_labelled_by_precision() {
        let arms = parse_arms(&json!(["fp32", "fp16", "bf16"])).unwrap();
        let labels: Vec<_> = arms.iter().map(|a| a.label.as_str()).collect();
        assert_eq!(labels, ["fp32", "f16", "bf16"]);
        let spec = arm_spec(
            &TrainSpec::default(),
            &arms[1],
            1,
            &Budget::new(5, 0.0).unwrap(),
        )
        .unwrap();
        assert_eq!(spec.train.precision, Precision::F16);
        assert_eq!(spec.train.max_steps, 5);
        assert_eq!(spec.name, "run-f16");
    }

    #[test]
    fn an_override_arm_keeps_everything_it_does_not_name() {
        let arms = parse_arms(&json!([{"label": "hot", "train": {"lr": 0.01}}])).unwrap();
        let base = TrainSpec::default();
        let s = arm_spec(&base, &arms[0], 0, &Budget::new(0, 30.0).unwrap()).unwrap();
        assert_eq!(s.train.lr, 0.01);
        assert_eq!(s.train.seed, base.train.seed);
        assert_eq!(s.model, base.model);
        assert_eq!(s.data, base.data);
        assert_eq!(s.train.max_time_s, 30.0);
    }

    #[test]
    fn arms_that_would_change_the_data_or_model_are_refused_by_field() {
        for (arms, field) in [
            (json!(["fp8"]), "arms[0]"),
            (
                json!(["fp32", {"train": {"seed": 3}}]),
                "arms[1].train.seed",
            ),
            (json!([{"model": {"d_model": 8}}]), "arms[0].model"),
            (
                json!([{"train": {"batch_size": 2}}]),
                "arms[0].train.batch_size",
            ),
            (json!(["f16", "fp16"]), "arms[1].label"),
            (json!([{"label": "a b"}]), "arms[0].label"),
            (json!([]), "arms"),
            (json!("fp32"), "arms"),
        ] {
            assert_eq!(parse_arms(&arms).unwrap_err().field, field, "{arms}");
        }
        let arms = parse_arms(&json!([{"train": {"lr": -1.0}}])).unwrap();
        let e = arm_spec(
            &TrainSpec::default(),
            &arms[0],
            0,
            &Budget::new(1, 0.0).unwrap(),
        )
        .unwrap_err();
        assert_eq!(e.field, "arms[0].train.lr");
    }

    #[test]
    fn an_experiment_without_a_budget_is_refused() {
        assert_eq!(Budget::new(0, 0.0).unwrap_err().field, "max_steps");
        assert_eq!(Budget::new(0, -1.0).unwrap_err().field, "max_time_s");
        assert!(Budget::new(0, 2.5).is_ok());
    }
}
