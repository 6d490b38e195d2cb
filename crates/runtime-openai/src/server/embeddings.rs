//! `POST /v1/embeddings`: one vector per input, from the service's
//! [`embed`](runtime_core::ModelService::embed).

use super::*;
use crate::embeddings::{EmbeddingsRequest, EmbeddingsResponse};

pub(super) async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let wire: EmbeddingsRequest = match read_json(&headers, &body, "embeddings request") {
        Ok(wire) => wire,
        Err(refused) => return *refused,
    };
    let requested = wire.model.clone();
    let (request, base64) = match wire.into_request() {
        Ok(parsed) => parsed,
        Err(err) => return ApiError(err).into_response(),
    };
    let model = requested
        .clone()
        .unwrap_or_else(|| state.options.model_name.clone());
    let span = tracing::info_span!("embeddings", model = %model, inputs = request.inputs.len());
    let answered = state
        .service
        .embed(requested.as_deref(), request)
        .instrument(span.clone())
        .await;
    span.in_scope(|| match answered {
        Ok(embeddings) => Json(EmbeddingsResponse::from_embeddings(
            embeddings, &model, base64,
        ))
        .into_response(),
        Err(err) => ApiError(err).into_response(),
    })
}
