//! Token identity between two engines, up to near ties.
//!
//! Two correct implementations of the same model, run greedily, produce the
//! same tokens until the two most likely candidates are so close that
//! floating-point differences (another SIMD path, another summation order)
//! can swap them. So a reference engine's answer is taken token by token,
//! with the gap between its top two log-probabilities, and the answer under
//! test must agree with it up to the first such near tie ([`compare`]).
//!
//! Where the reference can score a given text, the stronger check is
//! [`check_scored`]: every token of the answer, given everything before it,
//! must be the reference's own choice or within a near tie of it. That holds
//! past the first tie too, so a subtly broken engine that happens to part at
//! a tie is still caught.

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

/// One token of the reference answer.
#[derive(Debug, Clone)]
pub struct Step {
    /// The token's text.
    pub text: String,
    /// Log-probability of the chosen token minus that of the runner-up.
    pub gap: f64,
}

impl Step {
    /// A step from the chosen token's text and the reference's top
    /// log-probabilities, best first (a missing runner-up counts as
    /// impossible).
    pub fn new(text: impl Into<String>, top_logprobs: &[f64]) -> Self {
        let logprob = |i: usize| top_logprobs.get(i).copied().unwrap_or(f64::NEG_INFINITY);
        Self {
            text: text.into(),
            gap: logprob(0) - logprob(1),
        }
    }
}

/// How an answer relates to the reference.
#[derive(Debug, Clone, PartialEq)]
pub enum Agreement {
    /// Every reference token, and nothing more.
    Identical {
        /// How many tokens.
        tokens: usize,
    },
    /// The first `index` tokens agree; then the answers part at a tie of
    /// `gap` nats.
    Diverged {
        /// Where the answers part.
        index: usize,
        /// The reference's gap between its top two tokens there, in nats.
        gap: f64,
    },
    /// The answer agrees with the whole reference and then goes on.
    Longer,
}

impl Agreement {
    /// Whether two correct engines could have produced these answers.
    pub fn acceptable(&self) -> bool {
        match self {
            Self::Identical { .. } => true,
            Self::Diverged { gap, .. } => *gap <= NEAR_TIE,
            Self::Longer => false,
        }
    }
}

/// Where `answer` leaves the reference `steps`.
pub fn compare(steps: &[Step], answer: &str) -> Agreement {
    let mut agreed = String::new();
    for (index, step) in steps.iter().enumerate() {
        agreed.push_str(&step.text);
        if !answer.starts_with(&agreed) {
            return Agreement::Diverged {
                index,
                gap: step.gap,
            };
        }
    }
    if answer == agreed {
        Agreement::Identical {
            tokens: steps.len(),
        }
    } else {
        Agreement::Longer
    }
}

/// Compares each answer with its reference and returns a report line per
/// prompt, or every unacceptable difference (with the report) as the error.
pub fn check_all<'a>(
    cases: impl IntoIterator<Item = (&'a str, &'a [Step], &'a str)>,
) -> Result<String, String> {
    let mut report = Vec::new();
    let mut failures = Vec::new();
    for (prompt, steps, answer) in cases {
        let agreement = compare(steps, answer);
        report.push(match &agreement {
            Agreement::Identical { tokens } => format!("{prompt:?}: all {tokens} tokens identical"),
            Agreement::Diverged { index, gap } => {
                format!("{prompt:?}: {index} tokens identical, then a tie of {gap:.3} nats")
            }
            Agreement::Longer => format!("{prompt:?}: goes on after the reference stopped"),
        });
        if !agreement.acceptable() {
            let reference: String = steps.iter().map(|s| s.text.as_str()).collect();
            failures.push(format!(
                "{prompt:?}: {agreement:?}\n  answer:    {answer:?}\n  reference: {reference:?}"
            ));
        }
    }
    let report = report.join("\n");
    if failures.is_empty() {
        Ok(report)
    } else {
        Err(format!("{}\n\n{report}", failures.join("\n")))
    }
}

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

    fn steps(parts: &[(&str, f64)]) -> Vec<Step> {
        parts
            .iter()
            .map(|(text, gap)| Step {
                text: (*text).to_owned(),
                gap: *gap,
            })
            .collect()
    }

    #[test]
    fn the_same_answer_is_identical() {
        let reference = steps(&[("The", 3.0), (" sea", 1.0)]);
        assert_eq!(
            compare(&reference, "The sea"),
            Agreement::Identical { tokens: 2 }
        );
    }

    #[test]
    fn parting_at_a_near_tie_is_acceptable_and_at_a_clear_lead_is_not() {
        let tie = steps(&[("The", 3.0), (" sea", 0.05)]);
        let clear = steps(&[("The", 3.0), (" sea", 2.0)]);
        let agreement = compare(&tie, "The ocean");
        assert_eq!(
            agreement,
            Agreement::Diverged {
                index: 1,
                gap: 0.05
            }
        );
        assert!(agreement.acceptable());
        assert!(!compare(&clear, "The ocean").acceptable());
    }

    #[test]
    fn going_on_after_the_reference_stopped_is_not_acceptable() {
        let reference = steps(&[("The", 3.0)]);
        assert_eq!(compare(&reference, "The end"), Agreement::Longer);
        assert!(check_all([("p", reference.as_slice(), "The end")]).is_err());
    }

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

    #[test]
    fn a_missing_runner_up_is_an_infinite_lead() {
        assert!(Step::new("x", &[-0.1]).gap.is_infinite());
        assert!((Step::new("x", &[-0.1, -0.3]).gap - 0.2).abs() < 1e-12);
    }
}
