//! `POST /v1/completions`: OpenAI's legacy completions API, a raw prompt
//! continued with no chat template.

use super::*;
use crate::completions::{CompletionRequest, completion_chunk, completion_response};
use runtime_core::Prompt;

pub(super) async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let wire: CompletionRequest = match read_json(&headers, &body, "completions request") {
        Ok(wire) => wire,
        Err(refused) => return *refused,
    };
    let include_usage = wire.wants_usage();
    let requested = wire.model.clone();
    let (request, echo) = match wire.into_inference() {
        Ok(parsed) => parsed,
        Err(err) => return ApiError(err).into_response(),
    };
    let id = new_id("cmpl-");
    let model = requested
        .clone()
        .unwrap_or_else(|| state.options.model_name.clone());
    let created = unix_time();
    let span =
        tracing::info_span!("completions", model = %model, id = %id, stream = request.stream);
    let service = &state.service;
    // Echoed, the answer starts with the prompt as sent; token ids are
    // echoed as the model's text for them, spelled once the engine has taken
    // them (it is the one that refuses an id past its vocabulary).
    let echoed_ids = match &request.prompt {
        Some(Prompt::Tokens(tokens)) if echo => Some(tokens.clone()),
        _ => None,
    };
    let echoed_text = match &request.prompt {
        Some(prompt) if echo => prompt.as_text().unwrap_or_default().to_owned(),
        _ => String::new(),
    };
    let echoed = async |service: &Arc<dyn ModelService>| match &echoed_ids {
        Some(tokens) => service.detokenize(requested.as_deref(), tokens).await,
        None => Ok(echoed_text.clone()),
    };
    if request.stream {
        let started = async {
            let events = service
                .generate_events_at(Endpoint::Completions, requested.as_deref(), request)
                .await?;
            Ok::<_, Error>((events, echoed(service).await?))
        }
        .instrument(span.clone())
        .await;
        match started {
            Ok((events, echoed)) => {
                let chunks = completion_chunks(events, id, model, created, echoed, include_usage);
                Sse::new(InSpan::new(chunks, span))
                    .keep_alive(KeepAlive::default())
                    .into_response()
            }
            Err(err) => span.in_scope(|| ApiError(err).into_response()),
        }
    } else {
        let answered = async {
            let response = service
                .generate_at(Endpoint::Completions, requested.as_deref(), request)
                .await?;
            Ok::<_, Error>((echoed(service).await?, response))
        }
        .instrument(span.clone())
        .await;
        span.in_scope(|| match answered {
            Ok((echoed, response)) => {
                let text = echoed + &response.content;
                Json(completion_response(&response, &text, &id, &model, created)).into_response()
            }
            Err(err) => ApiError(err).into_response(),
        })
    }
}

/// The SSE body: the echoed prompt (if asked), text chunks, the finish
/// chunk, an optional usage chunk, `[DONE]`; an error mid-stream is an
/// `error` object, and ends the stream.
fn completion_chunks(
    events: EventStream,
    id: String,
    model: String,
    created: u64,
    echoed: String,
    include_usage: bool,
) -> impl Stream<Item = std::result::Result<Event, Infallible>> + Send {
    let data = |value: serde_json::Value| Event::default().data(value.to_string());
    let head = (!echoed.is_empty())
        .then(|| data(completion_chunk(&id, &model, created, &echoed, None, None)));
    let body = runtime_core::ensure_finished(events).flat_map(move |event| {
        let out: Vec<Event> = match event {
            Ok(StreamEvent::Delta(text)) => {
                vec![data(completion_chunk(
                    &id, &model, created, &text, None, None,
                ))]
            }
            Ok(StreamEvent::Finished {
                finish_reason,
                usage,
                ..
            }) => {
                let mut out = vec![data(completion_chunk(
                    &id,
                    &model,
                    created,
                    "",
                    finish_reason.as_ref(),
                    None,
                ))];
                if include_usage && let Some(usage) = &usage {
                    out.push(data(completion_chunk(
                        &id,
                        &model,
                        created,
                        "",
                        None,
                        Some(usage),
                    )));
                }
                out.push(Event::default().data("[DONE]"));
                out
            }
            Ok(_) => Vec::new(),
            Err(err) => vec![data_event(&ApiError(err).body())],
        };
        futures::stream::iter(out.into_iter().map(Ok))
    });
    futures::stream::iter(head.map(Ok)).chain(body)
}
