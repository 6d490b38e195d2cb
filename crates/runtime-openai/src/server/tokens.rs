//! `POST /tokenize` and `/detokenize`, in llama-server's shape (with an
//! optional `model`, which a gateway routes by), so clients can count
//! before they send.

use serde::Deserialize;

use super::*;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenizeRequest {
    #[serde(default)]
    model: Option<String>,
    content: String,
    /// Add the tokens the model starts a prompt with (default: no, as
    /// llama-server).
    #[serde(default)]
    add_special: bool,
    /// Special tokens in the text are always read as such.
    #[serde(default)]
    parse_special: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DetokenizeRequest {
    #[serde(default)]
    model: Option<String>,
    tokens: Vec<u32>,
}

/// The most tokens `/detokenize` takes, and the most bytes `/tokenize`
/// reads (the body limit bounds both too).
const MAX_TOKENS: usize = 1 << 20;

pub(super) async fn tokenize(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request: TokenizeRequest = match read_json(&headers, &body, "request") {
        Ok(request) => request,
        Err(response) => return *response,
    };
    if request.parse_special == Some(false) {
        return ApiError(Error::invalid_request(
            "parse_special",
            "false is not served: special tokens in the text are read as such",
        ))
        .into_response();
    }
    let span = tracing::info_span!("tokenize", model = request.model.as_deref().unwrap_or(""));
    let tokens = state
        .service
        .tokenize(
            request.model.as_deref(),
            &request.content,
            request.add_special,
        )
        .instrument(span)
        .await;
    match tokens {
        Ok(tokens) => Json(json!({ "tokens": tokens })).into_response(),
        Err(err) => ApiError(err).into_response(),
    }
}

pub(super) async fn detokenize(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request: DetokenizeRequest = match read_json(&headers, &body, "request") {
        Ok(request) => request,
        Err(response) => return *response,
    };
    if request.tokens.len() > MAX_TOKENS {
        return ApiError(Error::invalid_request(
            "tokens",
            format!(
                "holds {} tokens; at most {MAX_TOKENS} are taken",
                request.tokens.len()
            ),
        ))
        .into_response();
    }
    let span = tracing::info_span!("detokenize", model = request.model.as_deref().unwrap_or(""));
    let text = state
        .service
        .detokenize(request.model.as_deref(), &request.tokens)
        .instrument(span)
        .await;
    match text {
        Ok(content) => Json(json!({ "content": content })).into_response(),
        Err(err) => ApiError(err).into_response(),
    }
}
