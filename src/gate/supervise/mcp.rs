//! The MCP tools an agent calls. Each call acts for the agent its token
//! named (put in the HTTP request's extensions by
//! [`super::Supervise::handle`]), and sees only that agent's requests.

use std::sync::Arc;

use rmcp::ServerHandler;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation,
    JsonObject, ListToolsResult, PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::{RequestContext, RoleServer};
use serde_json::{Value, json};

use super::Inner;
use super::grants::{human_secs, is_declared};
use super::store::{Kind, MAX_MESSAGE, MAX_REASON, RequestError, Status, now};
use crate::gate::AgentIdentity;

pub const TOOLS: [&str; 4] = [
    "list_egress",
    "request_egress",
    "request_status",
    "message_operator",
];

/// One request's handler (the endpoint is stateless: one per request).
#[derive(Clone)]
pub struct Handler {
    inner: Arc<Inner>,
}

impl Handler {
    pub(crate) fn new(inner: Arc<Inner>) -> Self {
        Self { inner }
    }
}

fn schema(value: Value) -> Arc<JsonObject> {
    match value {
        Value::Object(o) => Arc::new(o),
        _ => unreachable!("tool schemas are objects"),
    }
}

fn tools() -> Vec<Tool> {
    vec![
        Tool::new(
            "list_egress",
            "What this agent may reach: the hosts its bottle's manifest allows, the grants \
             the operator approved (with their expiry), and its requests still pending.",
            schema(json!({"type": "object", "properties": {}})),
        ),
        Tool::new(
            "request_egress",
            "Ask the operator to let this agent reach a host its allowlist does not. \
             `host` is a host name (ports 443 and 80), `host:port`, or `*.domain`. \
             Returns the request's id and state (`pending` until the operator decides; \
             check with request_status).",
            schema(json!({
                "type": "object",
                "properties": {
                    "host": {"type": "string", "description": "e.g. `api.example.com`, `registry.example:5000`, `*.example.com`"},
                    "reason": {"type": "string", "maxLength": MAX_REASON, "description": "why the task needs it, for the operator"}
                },
                "required": ["host", "reason"]
            })),
        ),
        Tool::new(
            "request_status",
            "The state of one of this agent's requests: pending, approved (until when), \
             expired, denied (and why), revoked, or declared (the manifests now allow it).",
            schema(json!({
                "type": "object",
                "properties": {"id": {"type": "string"}},
                "required": ["id"]
            })),
        ),
        Tool::new(
            "message_operator",
            "Send a short message to the operator (shown by `bottle supervise`).",
            schema(json!({
                "type": "object",
                "properties": {"text": {"type": "string", "maxLength": MAX_MESSAGE}},
                "required": ["text"]
            })),
        ),
    ]
}

fn ok(value: Value) -> CallToolResponse {
    let mut result = CallToolResult::success(vec![ContentBlock::text(value.to_string())]);
    result.structured_content = Some(value);
    result.into()
}

fn refuse(message: impl Into<String>) -> CallToolResponse {
    CallToolResult::error(vec![ContentBlock::text(message.into())]).into()
}

fn arg<'a>(args: &'a Option<JsonObject>, name: &str) -> Option<&'a str> {
    args.as_ref()?.get(name)?.as_str()
}

impl Handler {
    fn list_egress(&self, who: &AgentIdentity) -> CallToolResponse {
        let now = now();
        let declared = self.inner.declared(&who.bottle);
        let file = match self.inner.grants.store().load() {
            Ok(f) => f,
            Err(e) => return refuse(format!("the grants cannot be read: {e}")),
        };
        let mine = file
            .records
            .iter()
            .filter(|r| r.is(who) && r.kind == Kind::Egress);
        let mut granted = Vec::new();
        let mut pending = Vec::new();
        for r in mine {
            match r.status(now) {
                Status::Approved => {
                    let until = r.until().unwrap_or_default();
                    granted.push(json!({"id": r.id, "host": r.host, "until": until,
                        "expires_in": human_secs(until.saturating_sub(now))}));
                }
                Status::Pending => pending.push(json!({"id": r.id, "host": r.host})),
                _ => {}
            }
        }
        self.inner.log(who, json!({"event": "list_egress"}));
        ok(json!({"declared": declared, "granted": granted, "pending": pending}))
    }

    fn request_egress(&self, who: &AgentIdentity, args: &Option<JsonObject>) -> CallToolResponse {
        let Some(host) = arg(args, "host") else {
            return refuse("`host` is required: a host name, `host:port` or `*.domain`");
        };
        let reason = arg(args, "reason").unwrap_or_default();
        let now = now();
        let host_shown: String = host.chars().take(260).collect();
        if let Ok(normal) = super::store::check_host(host)
            && is_declared(&normal, &self.inner.declared(&who.bottle))
        {
            self.inner.log(
                who,
                json!({"event": "request_egress", "host": normal, "decision": "declared"}),
            );
            return ok(json!({"host": normal, "state": "declared",
                "message": "the manifest already allows this host; no request is needed"}));
        }
        match self
            .inner
            .grants
            .store()
            .request_egress(who, host, reason, now)
        {
            Ok(record) => {
                self.inner.log(
                    who,
                    json!({"event": "request_egress", "id": record.id, "host": record.host,
                           "reason": record.reason, "decision": "pending"}),
                );
                ok(
                    json!({"id": record.id, "host": record.host, "state": record.status(now).as_str(),
                    "message": "the operator decides; ask request_status with this id"}),
                )
            }
            Err(RequestError::Refused(why)) => {
                self.inner.log(
                    who,
                    json!({"event": "request_egress", "host": host_shown,
                           "decision": "refused", "error": why.to_string()}),
                );
                refuse(why.to_string())
            }
            Err(RequestError::Store(e)) => {
                self.inner
                    .log(who, json!({"event": "error", "error": e.to_string()}));
                refuse("the request could not be recorded; tell the operator")
            }
        }
    }

    fn request_status(&self, who: &AgentIdentity, args: &Option<JsonObject>) -> CallToolResponse {
        let Some(id) = arg(args, "id") else {
            return refuse("`id` is required: the id request_egress returned");
        };
        let now = now();
        let file = match self.inner.grants.store().load() {
            Ok(f) => f,
            Err(e) => return refuse(format!("the grants cannot be read: {e}")),
        };
        // Another agent's request is as unknown as one that never was.
        let Some(record) = file.records.iter().find(|r| r.id == id && r.is(who)) else {
            self.inner.log(
                who,
                json!({"event": "request_status", "id": id.chars().take(40).collect::<String>(), "decision": "unknown"}),
            );
            return refuse(format!(
                "you have no request `{}`",
                id.chars().take(40).collect::<String>()
            ));
        };
        self.inner.log(
            who,
            json!({"event": "request_status", "id": record.id, "state": record.status(now).as_str()}),
        );
        let mut value = record.to_json(now);
        if let Some(o) = value.as_object_mut() {
            o.remove("bottle");
            if let Some(until) = record.until() {
                o.insert(
                    "expires_in".into(),
                    human_secs(until.saturating_sub(now)).into(),
                );
            }
        }
        ok(value)
    }

    fn message_operator(&self, who: &AgentIdentity, args: &Option<JsonObject>) -> CallToolResponse {
        let Some(text) = arg(args, "text") else {
            return refuse("`text` is required");
        };
        match self.inner.grants.store().message(who, text, now()) {
            Ok(record) => {
                self.inner.log(
                    who,
                    json!({"event": "message_operator", "id": record.id, "text": record.reason}),
                );
                ok(json!({"id": record.id, "state": "delivered"}))
            }
            Err(RequestError::Refused(why)) => {
                self.inner.log(
                    who,
                    json!({"event": "message_operator", "decision": "refused", "error": why.to_string()}),
                );
                refuse(why.to_string())
            }
            Err(RequestError::Store(e)) => {
                self.inner
                    .log(who, json!({"event": "error", "error": e.to_string()}));
                refuse("the message could not be recorded")
            }
        }
    }
}

fn identity(context: &RequestContext<RoleServer>) -> Option<AgentIdentity> {
    context
        .extensions
        .get::<http::request::Parts>()?
        .extensions
        .get::<AgentIdentity>()
        .cloned()
}

impl ServerHandler for Handler {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new(
                "bottle-supervise",
                env!("CARGO_PKG_VERSION"),
            ))
            .with_instructions(
                "Ask the operator of this sandbox for egress the manifest does not allow \
                 (request_egress), follow up (request_status), or tell them something \
                 (message_operator).",
            )
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, rmcp::ErrorData> {
        Ok(ListToolsResult::with_all_items(tools()))
    }

    fn get_tool(&self, name: &str) -> Option<Tool> {
        tools().into_iter().find(|t| t.name == name)
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, rmcp::ErrorData> {
        let Some(who) = identity(&context) else {
            return Err(rmcp::ErrorData::internal_error(
                "no agent identity on this request",
                None,
            ));
        };
        // The store does blocking file I/O under a lock: off the runtime.
        let handler = self.clone();
        let name = request.name.to_string();
        let args = request.arguments;
        let call = tokio::task::spawn_blocking(move || match name.as_str() {
            "list_egress" => Some(handler.list_egress(&who)),
            "request_egress" => Some(handler.request_egress(&who, &args)),
            "request_status" => Some(handler.request_status(&who, &args)),
            "message_operator" => Some(handler.message_operator(&who, &args)),
            _ => None,
        });
        match call.await {
            Ok(Some(response)) => Ok(response),
            Ok(None) => Err(rmcp::ErrorData::invalid_params(
                format!(
                    "no tool `{}`; the tools are {}",
                    request.name,
                    TOOLS.join(", ")
                ),
                None,
            )),
            Err(_) => Err(rmcp::ErrorData::internal_error("the tool failed", None)),
        }
    }
}
