//! Token identity between two engines, up to near ties.
//!
//! Two correct implementations of the same model, run greedily, produce the
//! same tokens until the two most likely candidates are so close that
//! floating-point differences (another SIMD path, another summation order)
//! can swap them. Comparing greedy paths therefore says nothing after the
//! first tie. So the reference engine scores the answer under test instead
//! ([`check_scored`]): every token, given everything before it, must be the
//! reference's own choice or within a near tie of it. That holds past the
//! first tie too, so a subtly broken engine that happens to part at a tie is
//! still caught.

/// The largest gap (in nats) between the reference's two most likely tokens
/// that still counts as a tie two correct implementations may break
/// differently.
pub const NEAR_TIE: f64 = 0.15;

/// The prompts the identity checks ask both engines.
pub const PROMPTS: &[&str] = &[
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain what a CPU does in one sentence.",
];

/// One token of an answer as a reference engine rates it after the same
/// prefix.
#[derive(Debug, Clone)]
pub struct Scored {
    /// The token's text.
    pub text: String,
    /// How far (in nats) the token's log-probability lies below the
    /// reference's most likely token; 0 when it is the reference's choice.
    pub deficit: f64,
}

/// Checks that every token of each answer is the reference's choice or
/// within [`NEAR_TIE`] of it; returns a report line per prompt, or every
/// token that is not (with the report) as the error.
pub fn check_scored<'a>(
    cases: impl IntoIterator<Item = (&'a str, &'a [Scored])>,
) -> Result<String, String> {
    let mut report = Vec::new();
    let mut failures = Vec::new();
    for (prompt, tokens) in cases {
        if tokens.is_empty() {
            failures.push(format!("{prompt:?}: the answer is empty"));
            continue;
        }
        let others = tokens.iter().filter(|t| t.deficit > 0.0).count();
        let largest = tokens.iter().map(|t| t.deficit).fold(0.0, f64::max);
        report.push(format!(
            "{prompt:?}: {} tokens, {others} not the reference's own choice, largest gap {largest:.3} nats",
            tokens.len()
        ));
        let answer: String = tokens.iter().map(|t| t.text.as_str()).collect();
        for (index, token) in tokens.iter().enumerate() {
            if token.deficit > NEAR_TIE {
                failures.push(format!(
                    "{prompt:?}: token {index} {:?} lies {:.3} nats below the reference's choice \
                     in {answer:?}",
                    token.text, token.deficit
                ));
            }
        }
    }
    let report = report.join("\n");
    if failures.is_empty() {
        Ok(report)
    } else {
        Err(format!("{}\n\n{report}", failures.join("\n")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scored(deficits: &[f64]) -> Vec<Scored> {
        deficits
            .iter()
            .map(|deficit| Scored {
                text: "t".to_owned(),
                deficit: *deficit,
            })
            .collect()
    }

    #[test]
    fn a_scored_answer_passes_only_if_every_token_is_within_a_near_tie() {
        let good = scored(&[0.0, 0.1, 0.0]);
        let late_error = scored(&[0.1, 0.0, 0.7]);
        assert!(check_scored([("p", good.as_slice())]).is_ok());
        let err = check_scored([("p", late_error.as_slice())]).unwrap_err();
        assert!(err.contains("token 2"), "{err}");
        assert!(check_scored([("p", &[][..])]).is_err(), "an empty answer");
    }
}
