//! Spec overrides as JSON, shared by presets (a request over its preset), forks (overrides over
//! the parent's spec) and experiment arms (an arm over the base spec): one deep merge, and one
//! allow-list check for the two that may change only some fields. Callers word the refusal,
//! since each names its own field prefix and reason.

use serde_json::{Map, Value};

/// What may be overridden, by top-level key: `None` any field of that section (an object);
/// `Some(fields)` only those fields of it; `Some(&[])` the key itself, a plain value.
pub type Allowed = [(&'static str, Option<&'static [&'static str]>)];

/// Why an override was refused.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// The dotted path (`train.seed`, `model`) is not in the allow-list.
    NotAllowed(String),
    /// The key names a section, but its value is not an object.
    NotAnObject(String),
}

/// The first override outside `allowed`, if any.
pub fn check(overrides: &Map<String, Value>, allowed: &Allowed) -> Result<(), Refusal> {
    for (key, v) in overrides {
        let Some((_, fields)) = allowed.iter().find(|(k, _)| k == key) else {
            return Err(Refusal::NotAllowed(key.clone()));
        };
        match (fields, v) {
            (Some(&[]), _) => {}
            (Some(fields), Value::Object(inner)) => {
                if let Some(k) = inner.keys().find(|k| !fields.contains(&k.as_str())) {
                    return Err(Refusal::NotAllowed(format!("{key}.{k}")));
                }
            }
            (None, Value::Object(_)) => {}
            _ => return Err(Refusal::NotAnObject(key.clone())),
        }
    }
    Ok(())
}

/// Objects merge key by key (recursively); anything else in `over` replaces `base`.
pub fn deep_merge(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) if slot.is_object() && v.is_object() => deep_merge(slot, v),
                    _ => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const ALLOWED: &Allowed = &[("name", Some(&[])), ("train", Some(&["lr"])), ("amp", None)];

    fn check_json(v: Value) -> Result<(), Refusal> {
        check(v.as_object().unwrap(), ALLOWED)
    }

    #[test]
    fn allowed_fields_sections_and_plain_keys_pass() {
        check_json(json!({"name": "x", "train": {"lr": 1e-3}, "amp": {"init_scale": 2.0}}))
            .unwrap();
    }

    #[test]
    fn the_first_field_outside_the_list_is_named_with_its_section() {
        assert_eq!(
            check_json(json!({"train": {"seed": 1}})),
            Err(Refusal::NotAllowed("train.seed".into()))
        );
        assert_eq!(
            check_json(json!({"model": {}})),
            Err(Refusal::NotAllowed("model".into()))
        );
    }

    #[test]
    fn a_section_given_as_a_plain_value_is_not_an_object() {
        assert_eq!(
            check_json(json!({"amp": 3})),
            Err(Refusal::NotAnObject("amp".into()))
        );
        assert_eq!(
            check_json(json!({"train": "fast"})),
            Err(Refusal::NotAnObject("train".into()))
        );
    }
}
