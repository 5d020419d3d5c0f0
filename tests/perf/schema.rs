//! A hand-written checker for the subset of JSON Schema that docs/perf-schema.json uses
//! (`type` (one or a list), `enum`, `required`, `properties`, `additionalProperties: false`,
//! `items`, `minItems`, `minimum`, `anyOf`, local `$ref`). The `jsonschema` crate would pull
//! in a large dependency tree (regex, HTTP resolvers) for these few keywords; this checker
//! fails on any keyword it does not know, so the schema cannot silently outgrow it.

use serde_json::Value;

/// Keywords the checker understands (or that only annotate).
const KNOWN: &[&str] = &[
    "$schema",
    "$id",
    "$defs",
    "$ref",
    "title",
    "description",
    "type",
    "enum",
    "required",
    "properties",
    "additionalProperties",
    "items",
    "minItems",
    "minimum",
    "anyOf",
];

/// Every violation of `schema` by `v` (empty: valid). `root` resolves `$ref`s.
pub(super) fn validate(root: &Value, schema: &Value, v: &Value, path: &str) -> Vec<String> {
    let mut errs = Vec::new();
    let Some(s) = schema.as_object() else {
        return vec![format!("{path}: schema is not an object")];
    };
    for k in s.keys() {
        if !KNOWN.contains(&k.as_str()) {
            errs.push(format!(
                "{path}: schema keyword {k} is not supported by the checker"
            ));
        }
    }
    if let Some(r) = s.get("$ref").and_then(Value::as_str) {
        let Some(name) = r.strip_prefix("#/$defs/") else {
            return vec![format!("{path}: unsupported $ref {r}")];
        };
        return validate(root, &root["$defs"][name], v, path);
    }
    if let Some(any) = s.get("anyOf").and_then(Value::as_array) {
        let all: Vec<Vec<String>> = any.iter().map(|a| validate(root, a, v, path)).collect();
        if all.iter().all(|e| !e.is_empty()) {
            errs.push(format!("{path}: matches none of anyOf: {all:?}"));
        }
    }
    if let Some(t) = s.get("type") {
        let types: Vec<&str> = match t {
            Value::String(one) => vec![one.as_str()],
            Value::Array(list) => list.iter().filter_map(Value::as_str).collect(),
            _ => vec![],
        };
        if !types.iter().any(|t| type_ok(t, v)) {
            errs.push(format!("{path}: {v} is not of type {types:?}"));
            return errs;
        }
    }
    if let Some(e) = s.get("enum").and_then(Value::as_array) {
        if !e.contains(v) {
            errs.push(format!("{path}: {v} is not one of {e:?}"));
        }
    }
    if let (Some(min), Some(x)) = (s.get("minimum").and_then(Value::as_f64), v.as_f64()) {
        if x < min {
            errs.push(format!("{path}: {x} is below the minimum {min}"));
        }
    }
    if let Some(obj) = v.as_object() {
        if let Some(req) = s.get("required").and_then(Value::as_array) {
            for r in req.iter().filter_map(Value::as_str) {
                if !obj.contains_key(r) {
                    errs.push(format!("{path}: missing required {r}"));
                }
            }
        }
        let props = s.get("properties").and_then(Value::as_object);
        for (k, val) in obj {
            match props.and_then(|p| p.get(k)) {
                Some(ps) => errs.extend(validate(root, ps, val, &format!("{path}.{k}"))),
                None if s.get("additionalProperties") == Some(&Value::Bool(false)) => {
                    errs.push(format!("{path}: unexpected property {k}"));
                }
                None => {}
            }
        }
    }
    if let Some(arr) = v.as_array() {
        if let Some(min) = s.get("minItems").and_then(Value::as_u64) {
            if (arr.len() as u64) < min {
                errs.push(format!("{path}: {} items, fewer than {min}", arr.len()));
            }
        }
        if let Some(items) = s.get("items") {
            for (i, it) in arr.iter().enumerate() {
                errs.extend(validate(root, items, it, &format!("{path}[{i}]")));
            }
        }
    }
    errs
}

fn type_ok(t: &str, v: &Value) -> bool {
    match t {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        "integer" => v.is_u64() || v.is_i64(),
        "number" => v.is_number(),
        _ => false,
    }
}

#[test]
fn the_checker_rejects_what_it_should() {
    let root: Value = serde_json::from_str(
        r#"{"type":"object","required":["a"],"additionalProperties":false,
            "properties":{"a":{"type":"integer","minimum":1},"b":{"anyOf":[{"type":"null"},{"enum":["x"]}]}}}"#,
    )
    .unwrap();
    let ok = serde_json::json!({"a": 2, "b": "x"});
    assert!(validate(&root, &root, &ok, "$").is_empty());
    for bad in [
        serde_json::json!({"b": null}),
        serde_json::json!({"a": 0}),
        serde_json::json!({"a": 1.5}),
        serde_json::json!({"a": 1, "c": 1}),
        serde_json::json!({"a": 1, "b": "y"}),
    ] {
        assert!(
            !validate(&root, &root, &bad, "$").is_empty(),
            "{bad} passed"
        );
    }
}
