//! Log-probabilities from the logits: the drawn token's and the most likely
//! ones', under the model's own distribution at that position (before
//! temperature, top-p or a schema's mask), as llama-server and vLLM report
//! them.

use runtime_core::{TokenLogprob, TopLogprob};

/// The entry of `chosen`, drawn from `logits`, with the `top` most likely
/// tokens, most likely first. `words` are the tokens' bytes.
pub(crate) fn entry(logits: &[f32], chosen: u32, top: usize, words: &[Vec<u8>]) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // In f64: 49k terms summed in f32 lose the small ones.
    let sum: f64 = logits.iter().map(|&x| f64::from(x - max).exp()).sum();
    let norm = f64::from(max) + sum.ln();
    let logprob = |token: usize| (f64::from(logits[token]) - norm) as f32;
    let mut best: Vec<usize> = Vec::with_capacity(top + 1);
    for token in 0..logits.len() {
        if best.len() == top
            && best
                .last()
                .is_none_or(|&last| logits[token] <= logits[last])
        {
            continue;
        }
        let at = best.partition_point(|&other| logits[other] >= logits[token]);
        best.insert(at, token);
        best.truncate(top);
    }
    let (text, bytes) = spelled(words, chosen as usize);
    let mut out = TokenLogprob::new(
        text,
        logprob(chosen as usize),
        best.into_iter()
            .map(|token| {
                let (text, bytes) = spelled(words, token);
                let mut alternative = TopLogprob::new(text, logprob(token));
                alternative.bytes = bytes;
                alternative
            })
            .collect(),
    );
    out.bytes = bytes;
    out
}

/// A token's text (lossy where its bytes are not UTF-8 alone) and bytes; a
/// control token is its name, with no bytes of the answer's.
fn spelled(words: &[Vec<u8>], token: usize) -> (String, Option<Vec<u8>>) {
    match words.get(token).map(Vec::as_slice) {
        Some([0xff, name @ ..]) => (String::from_utf8_lossy(name).into_owned(), None),
        Some(bytes) => (
            String::from_utf8_lossy(bytes).into_owned(),
            Some(bytes.to_vec()),
        ),
        None => (String::new(), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words() -> Vec<Vec<u8>> {
        vec![
            b"a".to_vec(),
            b"b".to_vec(),
            b"\xffEND".to_vec(),
            vec![0xe2, 0x82],
        ]
    }

    #[test]
    fn the_entry_is_the_log_softmax_with_the_best_tokens_first() {
        let logits = [1.0, 3.0, 2.0, -1.0];
        let entry = entry(&logits, 0, 3, &words());
        let norm = logits.iter().map(|x: &f32| x.exp()).sum::<f32>().ln();
        assert!((entry.logprob - (1.0 - norm)).abs() < 1e-6);
        assert_eq!(entry.token, "a");
        let tops: Vec<&str> = entry
            .top_logprobs
            .iter()
            .map(|t| t.token.as_str())
            .collect();
        assert_eq!(tops, ["b", "END", "a"]);
        assert!((entry.top_logprobs[0].logprob - (3.0 - norm)).abs() < 1e-6);
        assert_eq!(
            entry.top_logprobs[1].bytes, None,
            "a control token has no bytes"
        );
        let probabilities: f32 = logits.iter().map(|x| (x - norm).exp()).sum();
        assert!((probabilities - 1.0).abs() < 1e-6);
    }

    #[test]
    fn masked_logits_do_not_count_and_partial_characters_keep_their_bytes() {
        let logits = [f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY, 0.0];
        let entry = entry(&logits, 3, 0, &words());
        assert!((entry.logprob - 0.5f32.ln()).abs() < 1e-6);
        assert!(entry.top_logprobs.is_empty());
        assert_eq!(entry.bytes.as_deref(), Some(&[0xe2, 0x82][..]));
    }
}
