//! `POST /v1/messages` and `/v1/messages/count_tokens`: Anthropic's
//! Messages API over the chat service, with errors in Anthropic's shape.

use super::*;
use crate::anthropic::{MessagesRequest, MessagesStream, error_body, message_from_inference};

/// Whether `path` is one of the Messages API's, whose errors take
/// Anthropic's shape.
pub(super) fn is_messages_route(path: &str) -> bool {
    path == "/v1/messages" || path.starts_with("/v1/messages/")
}

/// `err` as Anthropic's clients read an error: its status, and
/// `{"type": "error", "error": {"type", "message"}}`.
pub(super) fn error_response(err: &ApiError) -> Response {
    let status = err.status();
    let body = error_body(status.as_u16(), &err.public_message());
    err.with_retry_after((status, Json(body)).into_response())
}

fn refused(err: Error) -> Response {
    error_response(&ApiError(err))
}

/// A refusal of the router's own (no key, not JSON) in Anthropic's shape.
pub(super) fn refusal(status: StatusCode, message: &str) -> Response {
    (status, Json(error_body(status.as_u16(), message))).into_response()
}

/// The request body, parsed; or the refusal.
fn parse(headers: &HeaderMap, body: &Bytes) -> std::result::Result<MessagesRequest, Box<Response>> {
    if !is_json(headers) {
        return Err(Box::new(refusal(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send the request as JSON with Content-Type: application/json",
        )));
    }
    serde_json::from_slice(body).map_err(|err| {
        Box::new(refused(Error::invalid_request(
            "body",
            format!("is not a valid Messages request: {err}"),
        )))
    })
}

pub(super) async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let wire = match parse(&headers, &body) {
        Ok(wire) => wire,
        Err(response) => return *response,
    };
    let requested = wire.model.clone();
    let request = match wire.into_inference(false) {
        Ok(request) => request,
        Err(err) => return refused(err),
    };
    let id = new_id("msg_");
    let model = requested
        .clone()
        .unwrap_or_else(|| state.options.model_name.clone());
    let span = tracing::info_span!("messages", model = %model, id = %id, stream = request.stream);
    let service = &state.service;
    if request.stream {
        let started = service
            .generate_events_at(Endpoint::Messages, requested.as_deref(), request)
            .instrument(span.clone())
            .await;
        match started {
            Ok(events) => {
                let events = InSpan::new(message_events(events, id, model), span);
                Sse::new(events)
                    .keep_alive(KeepAlive::default())
                    .into_response()
            }
            Err(err) => span.in_scope(|| refused(err)),
        }
    } else {
        let answered = service
            .generate_at(Endpoint::Messages, requested.as_deref(), request)
            .instrument(span.clone())
            .await;
        span.in_scope(|| {
            match answered.and_then(|response| message_from_inference(&response, &id, &model)) {
                Ok(message) => Json(message).into_response(),
                Err(err) => refused(err),
            }
        })
    }
}

/// The SSE body: each event named, as Anthropic's clients require; an error
/// (or an end without a finish) is an `error` event, and ends the stream.
fn message_events(
    events: EventStream,
    id: String,
    model: String,
) -> impl Stream<Item = std::result::Result<Event, Infallible>> + Send {
    let mut encoder = MessagesStream::new(id, model);
    let head = encoder.start();
    let body = runtime_core::ensure_finished(events).map(move |event| match event {
        Ok(event) => encoder.event(event),
        Err(err) => {
            let err = ApiError(err);
            encoder.error(err.status().as_u16(), &err.public_message())
        }
    });
    futures::stream::iter([head])
        .chain(body)
        .flat_map(|events| {
            futures::stream::iter(
                events
                    .into_iter()
                    .map(|(name, data)| Ok(Event::default().event(name).data(data.to_string()))),
            )
        })
}

pub(super) async fn count_tokens(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let wire = match parse(&headers, &body) {
        Ok(wire) => wire,
        Err(response) => return *response,
    };
    let requested = wire.model.clone();
    let request = match wire.into_inference(true) {
        Ok(request) => request,
        Err(err) => return refused(err),
    };
    let span = tracing::info_span!("count_tokens", model = requested.as_deref().unwrap_or(""));
    let counted = state
        .service
        .count_prompt_tokens(requested.as_deref(), request)
        .instrument(span)
        .await;
    match counted {
        Ok(tokens) => Json(json!({"input_tokens": tokens})).into_response(),
        Err(err) => refused(err),
    }
}
