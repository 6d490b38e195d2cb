//! `POST /v1/responses`, `GET` and `DELETE /v1/responses/{id}`: OpenAI's
//! Responses API over the chat service, with the bounded store.

use axum::extract::Path;

use super::*;
use crate::responses::{Echo, ResponsesRequest, ResponsesStream, response_from_inference};

pub(super) async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let wire: ResponsesRequest = match read_json(&headers, &body, "Responses request") {
        Ok(wire) => wire,
        Err(refused) => return *refused,
    };
    let previous = match &wire.previous_response_id {
        Some(id) => match state.responses.conversation(id) {
            Ok(conversation) => Some(conversation),
            Err(err) => return ApiError(err).into_response(),
        },
        None => None,
    };
    let requested = wire.model.clone();
    let (request, echo) = match wire.into_inference(previous.as_deref().map(Vec::as_slice)) {
        Ok(parsed) => parsed,
        Err(err) => return ApiError(err).into_response(),
    };
    let id = new_id("resp_");
    let model = requested
        .clone()
        .unwrap_or_else(|| state.options.model_name.clone());
    let created_at = unix_time();
    let span = tracing::info_span!("responses", model = %model, id = %id, stream = request.stream);
    let service = &state.service;
    if request.stream {
        let started = service
            .generate_events_at(Endpoint::Responses, requested.as_deref(), request)
            .instrument(span.clone())
            .await;
        match started {
            Ok(events) => {
                let encoder = ResponsesStream::new(id, model, created_at, echo);
                let events = response_events(events, encoder, state.responses.clone());
                Sse::new(InSpan::new(events, span))
                    .keep_alive(KeepAlive::default())
                    .into_response()
            }
            Err(err) => span.in_scope(|| ApiError(err).into_response()),
        }
    } else {
        let answered = service
            .generate_at(Endpoint::Responses, requested.as_deref(), request)
            .instrument(span.clone())
            .await;
        span.in_scope(|| match answered {
            Ok(response) => {
                let whole = response_from_inference(&response, &echo, &id, &model, created_at);
                keep(&state.responses, &echo, &whole, &response);
                Json(whole).into_response()
            }
            Err(err) => ApiError(err).into_response(),
        })
    }
}

/// Stores a whole answer when its request asked for it.
fn keep(
    store: &ResponseStore,
    echo: &Echo,
    whole: &serde_json::Value,
    response: &runtime_core::InferenceResponse,
) {
    if echo.store() {
        let conversation = crate::responses::with_answer(
            echo.conversation.clone(),
            &response.content,
            &response.tool_calls,
        );
        store.put(whole.clone(), conversation);
    }
}

/// The SSE body: each event named and numbered; a failure is
/// `response.failed`, and ends the stream. A completed stream is stored when
/// its request asked for it.
fn response_events(
    events: EventStream,
    mut encoder: ResponsesStream,
    store: Arc<ResponseStore>,
) -> impl Stream<Item = std::result::Result<Event, Infallible>> + Send {
    let store_it = encoder.echo().store();
    let head = encoder.start();
    let body = runtime_core::ensure_finished(events).map(move |event| {
        let finishing = matches!(event, Ok(StreamEvent::Finished { .. }));
        let encoded = match event {
            Ok(event) => encoder.event(event),
            Err(err) => Err(err),
        };
        match encoded {
            Ok(out) => {
                // Once, when the answer completes (a failed one has no
                // completed response to keep).
                if store_it
                    && finishing
                    && let Some((whole, conversation)) = encoder.completed()
                {
                    store.put(whole, conversation);
                }
                out
            }
            Err(err) => {
                let err = ApiError(err);
                encoder.error(err.0.code(), &err.public_message())
            }
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

pub(super) async fn retrieve(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    match state.responses.get(&id) {
        Some(response) => Json(&*response).into_response(),
        None => not_kept(&id),
    }
}

pub(super) async fn delete(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    if state.responses.delete(&id) {
        Json(json!({"id": id, "object": "response.deleted", "deleted": true})).into_response()
    } else {
        not_kept(&id)
    }
}

fn not_kept(id: &str) -> Response {
    refusal(
        StatusCode::NOT_FOUND,
        &format!(
            "response `{id}` is not kept here (only responses sent with `store: true` are, \
             for a limited time)"
        ),
        "invalid_request_error",
    )
}
