//! Checking JSON answers against the OpenAPI document the server serves: types,
//! required properties, and no properties the document does not list.

use serde_json::Value;

/// The component schema `name` of the OpenAPI document.
pub fn schema<'a>(doc: &'a Value, name: &str) -> &'a Value {
    &doc["components"]["schemas"][name]
}

/// Checks `value` against `schema` of the OpenAPI document `doc`: types, required
/// properties, and no properties the schema does not list.
pub fn check(doc: &Value, schema: &Value, value: &Value, at: &str) {
    if let Some(reference) = schema["$ref"].as_str() {
        let name = reference.trim_start_matches("#/components/schemas/");
        return check(doc, self::schema(doc, name), value, at);
    }
    if let Some(options) = schema["oneOf"].as_array() {
        let fits = options
            .iter()
            .any(|option| std::panic::catch_unwind(|| check(doc, option, value, at)).is_ok());
        assert!(fits, "{at}: {value} fits none of {options:?}");
        return;
    }
    let types: Vec<&str> = match &schema["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
        _ => vec![],
    };
    if value.is_null() {
        assert!(
            types.contains(&"null") || types.is_empty(),
            "{at}: null where {schema} is"
        );
        return;
    }
    let kind = match value {
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
        Value::Null => "null",
    };
    assert!(
        types.is_empty()
            || types.contains(&kind)
            || (kind == "integer" && types.contains(&"number")),
        "{at}: a {kind} where {schema} is"
    );
    match value {
        Value::Object(fields) => {
            let properties = schema["properties"].as_object();
            for required in schema["required"].as_array().into_iter().flatten() {
                let name = required.as_str().unwrap_or_default();
                assert!(
                    fields.contains_key(name),
                    "{at}: {name} is missing from {value}"
                );
            }
            if let Some(properties) = properties {
                for (name, field) in fields {
                    let property = properties
                        .get(name)
                        .unwrap_or_else(|| panic!("{at}: {name} is not in the document"));
                    check(doc, property, field, &format!("{at}.{name}"));
                }
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                check(doc, &schema["items"], item, &format!("{at}[{i}]"));
            }
        }
        _ => {}
    }
}

/// The schema of the JSON body a `method` request to `path` answers with under
/// `status`, as the document `doc` gives it (`path` as the document spells it, e.g.
/// `/v1/views/{name}`).
pub fn response_schema<'a>(doc: &'a Value, method: &str, path: &str, status: u16) -> &'a Value {
    let response = &doc["paths"][path][method]["responses"][status.to_string()];
    let content = &response["content"];
    let schema = content["application/json"]["schema"]
        .as_object()
        .map(|_| &content["application/json"]["schema"])
        .unwrap_or(&content["text/event-stream"]["schema"]);
    assert!(
        schema.is_object(),
        "the document has no schema for {method} {path} answering {status}: {response}"
    );
    schema
}
