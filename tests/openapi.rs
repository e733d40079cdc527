//! The OpenAPI description is generated from the handlers: these tests hold it to the router
//! (every served method + path is described) and to docs/API.md (its request-body examples
//! validate against the described schemas).

use serde_json::Value;
use std::collections::BTreeSet;

const METHODS: [&str; 5] = ["get", "post", "put", "delete", "patch"];

/// `(METHOD, path)` of every `.route("path", m(h).m2(h))` call in src/http/*.rs.
fn served_routes() -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/http");
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let src = std::fs::read_to_string(&path).unwrap();
        for call in src.split(".route(").skip(1) {
            let Some(rest) = call.strip_prefix('"') else {
                continue;
            };
            let (route, handlers) = rest.split_once('"').unwrap();
            let handlers = handlers.split("))").next().unwrap();
            for part in handlers.split(|c: char| !c.is_ascii_alphanumeric() && c != '_') {
                if METHODS.contains(&part) {
                    out.insert((part.to_uppercase(), route.to_string()));
                }
            }
        }
    }
    out
}

fn described_routes(doc: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            if METHODS.contains(&method.as_str()) {
                out.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    out
}

#[test]
fn every_served_route_is_in_the_description() {
    let served = served_routes();
    assert!(served.len() >= 25, "parsed too few routes: {served:?}");
    let described = described_routes(&ampserve::http::openapi::document());
    let missing: Vec<_> = served.difference(&described).collect();
    assert!(
        missing.is_empty(),
        "routes without a description: {missing:?}"
    );
    let extra: Vec<_> = described.difference(&served).collect();
    assert!(extra.is_empty(), "described but not served: {extra:?}");
}

#[test]
fn the_description_is_openapi_3_1() {
    let doc = ampserve::http::openapi::document();
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        doc["openapi"]
    );
}

/// Errors of `value` against `schema` (a small walker: `$ref`, `type`, `required`,
/// `properties`, `additionalProperties: false`, `items`, `oneOf`/`anyOf`, min/max).
fn check(doc: &Value, schema: &Value, value: &Value, at: &str, errs: &mut Vec<String>) {
    if let Some(r) = schema["$ref"].as_str() {
        let name = r.rsplit('/').next().unwrap();
        return check(doc, &doc["components"]["schemas"][name], value, at, errs);
    }
    for key in ["oneOf", "anyOf"] {
        if let Some(alts) = schema[key].as_array() {
            let ok = alts.iter().any(|s| {
                let mut e = Vec::new();
                check(doc, s, value, at, &mut e);
                e.is_empty()
            });
            if !ok {
                errs.push(format!("{at}: matches no alternative of {key}"));
            }
            return;
        }
    }
    let types: Vec<&str> = match &schema["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
        _ => vec![],
    };
    let kind = match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    };
    let fits = types.is_empty()
        || types.contains(&kind)
        || (kind == "integer" && types.contains(&"number"));
    if !fits {
        errs.push(format!("{at}: expected {types:?}, got {kind}"));
        return;
    }
    if let Some(n) = value.as_f64() {
        if schema["minimum"].as_f64().is_some_and(|m| n < m)
            || schema["maximum"].as_f64().is_some_and(|m| n > m)
        {
            errs.push(format!("{at}: {n} out of range"));
        }
    }
    if let Value::Object(obj) = value {
        for req in schema["required"].as_array().into_iter().flatten() {
            if !obj.contains_key(req.as_str().unwrap()) {
                errs.push(format!("{at}: missing required `{req}`"));
            }
        }
        let props = schema["properties"].as_object();
        for (k, v) in obj {
            match props.and_then(|p| p.get(k)) {
                Some(s) => check(doc, s, v, &format!("{at}.{k}"), errs),
                None if schema["additionalProperties"] == Value::Bool(false) => {
                    errs.push(format!("{at}: unknown field `{k}`"))
                }
                None => {}
            }
        }
    }
    if let (Value::Array(items), Some(s)) = (value, schema.get("items")) {
        for (i, v) in items.iter().enumerate() {
            check(doc, s, v, &format!("{at}[{i}]"), errs);
        }
    }
}

fn request_schema(doc: &Value, method: &str, path: &str) -> Value {
    doc["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"].clone()
}

fn errors_of(method: &str, path: &str, body: &Value) -> Vec<String> {
    let doc = ampserve::http::openapi::document();
    let schema = request_schema(&doc, method, path);
    assert!(
        !schema.is_null(),
        "no JSON request body for {method} {path}"
    );
    let mut errs = Vec::new();
    check(&doc, &schema, body, "body", &mut errs);
    errs
}

fn api_md() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/API.md")).unwrap()
}

/// The `-d '...'` bodies of the `curl -X POST .../api/jobs` examples.
fn job_examples(md: &str) -> Vec<Value> {
    md.split("curl -X POST localhost:8080/api/jobs")
        .skip(1)
        .filter_map(|rest| rest.split_once("-d '").map(|(_, b)| b))
        .map(|b| serde_json::from_str(b.split('\'').next().unwrap()).unwrap())
        .collect()
}

/// The JSON lines of the block under `### `POST /api/translate``.
fn translate_examples(md: &str) -> Vec<Value> {
    let section = md.split("### `POST /api/translate`").nth(1).unwrap();
    let block = section
        .split("```json")
        .nth(1)
        .unwrap()
        .split("```")
        .next()
        .unwrap();
    block
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn job_submission_examples_in_api_md_validate_against_the_schema() {
    let examples = job_examples(&api_md());
    assert!(examples.len() >= 2, "{examples:?}");
    for body in &examples {
        let errs = errors_of("post", "/api/jobs", body);
        assert!(errs.is_empty(), "{body}: {errs:?}");
    }
}

#[test]
fn translate_examples_in_api_md_validate_against_the_schema() {
    let examples = translate_examples(&api_md());
    assert!(examples.len() >= 2, "{examples:?}");
    for body in &examples {
        let errs = errors_of("post", "/api/translate", body);
        assert!(errs.is_empty(), "{body}: {errs:?}");
    }
}

#[test]
fn translate_schema_rejects_unknown_fields_and_wrong_types() {
    let unknown = errors_of("post", "/api/translate", &serde_json::json!({"txt": "a"}));
    assert!(unknown.iter().any(|e| e.contains("`txt`")), "{unknown:?}");
    let wrong = errors_of(
        "post",
        "/api/translate",
        &serde_json::json!({"beam_size": "4"}),
    );
    assert!(wrong.iter().any(|e| e.contains("beam_size")), "{wrong:?}");
}
