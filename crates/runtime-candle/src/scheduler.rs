//! The scheduler thread: each step it admits waiting requests into free
//! slots, then runs one batch (a chunk of a prompt still being read and the
//! next token of every sequence already generating) and hands each sequence
//! its token.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::{Duration, Instant};

use candle_transformers::generation::LogitsProcessor;
use runtime_core::{Error, FinishReason, Result, StreamEvent, Timings, TokenLogprob, Usage};

use crate::engine::Job;
use crate::model::LoadedModel;
use crate::native::Step;
use crate::runner::Runner;
use crate::sampling::sample;
use crate::stop::StopScanner;

/// The thread that runs the engine.
pub(crate) struct Scheduler {
    pub(crate) model: Arc<LoadedModel>,
    pub(crate) runner: Runner,
    pub(crate) queue: Receiver<Job>,
    pub(crate) slots: usize,
    pub(crate) shutting_down: Arc<AtomicBool>,
    pub(crate) active: Arc<AtomicUsize>,
    /// Tokens generated since the engine started, over every request.
    pub(crate) generated_total: Arc<AtomicU64>,
}

/// A request in a slot.
pub(crate) struct Sequence<'t> {
    pub(crate) job: Job,
    pub(crate) slot: usize,
    /// Prompt tokens already in the KV cache.
    pub(crate) fed: usize,
    /// Tokens generated (and sent) so far.
    pub(crate) generated: usize,
    /// The engine's count of every token generated.
    pub(crate) generated_total: Arc<AtomicU64>,
    /// The token generated last, to feed next.
    pub(crate) next: u32,
    pub(crate) sampler: LogitsProcessor,
    pub(crate) decoder: Decoder<'t>,
    pub(crate) stops: StopScanner,
    pub(crate) started: Option<Instant>,
    pub(crate) prefill: Duration,
    pub(crate) decode_started: Option<Instant>,
    /// The log-probabilities of the token just drawn, when asked for.
    pub(crate) logprob: Option<TokenLogprob>,
}

pub(crate) type Decoder<'t> = tokenizers::DecodeStream<
    't,
    tokenizers::ModelWrapper,
    tokenizers::NormalizerWrapper,
    tokenizers::PreTokenizerWrapper,
    tokenizers::PostProcessorWrapper,
    tokenizers::DecoderWrapper,
>;

/// What a sampled token did to its sequence.
pub(crate) enum Progress {
    Continue,
    Finished,
    /// The reader dropped the stream: nobody to tell.
    Cancelled,
}

impl Scheduler {
    pub(crate) fn run(mut self) {
        let model = self.model.clone();
        let tokenizer = model.tokenizer.inner();
        let mut free: Vec<usize> = (0..self.slots).rev().collect();
        let mut running: Vec<Sequence<'_>> = Vec::with_capacity(self.slots);
        loop {
            if self.shutting_down.load(Ordering::SeqCst) {
                for sequence in running.drain(..) {
                    let _ = sequence.job.events.send(Err(Error::ShutDown));
                }
                // Jobs still queued are told too.
                while let Ok(job) = self.queue.try_recv() {
                    let _ = job.events.send(Err(Error::ShutDown));
                }
                self.active.store(0, Ordering::SeqCst);
                return;
            }
            // Admit waiting jobs into free slots; with nothing to run, wait for one.
            self.active.store(running.len(), Ordering::SeqCst);
            while let Some(&slot) = free.last() {
                let job = if running.is_empty() {
                    match self.queue.recv() {
                        Ok(job) => job,
                        Err(_) => return, // the sender is gone: shutting down
                    }
                } else {
                    match self.queue.try_recv() {
                        Ok(job) => job,
                        Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                    }
                };
                if job.events.is_closed() {
                    continue; // its reader left while it waited
                }
                if self.shutting_down.load(Ordering::SeqCst) {
                    let _ = job.events.send(Err(Error::ShutDown));
                    continue;
                }
                free.pop();
                tracing::debug!(
                    prompt_tokens = job.prompt.len(),
                    queued_ms = job.queued_at.elapsed().as_millis() as u64,
                    slot,
                    "generation starts"
                );
                running.push(Sequence {
                    sampler: LogitsProcessor::from_sampling(job.seed, job.sampling.clone()),
                    decoder: tokenizer.decode_stream(true),
                    stops: StopScanner::new(job.stop.clone()),
                    job,
                    slot,
                    fed: 0,
                    generated: 0,
                    generated_total: self.generated_total.clone(),
                    next: 0,
                    started: None,
                    prefill: Duration::ZERO,
                    decode_started: None,
                    logprob: None,
                });
            }
            // Readers that left free their slots.
            running.retain(|sequence| {
                let gone = sequence.job.events.is_closed();
                if gone {
                    self.runner.release(sequence.slot);
                    free.push(sequence.slot);
                }
                !gone
            });
            self.active.store(running.len(), Ordering::SeqCst);
            if running.is_empty() {
                continue;
            }
            self.step(&mut running, &mut free);
        }
    }

    /// One batch: every generating sequence's next token, then prompt
    /// chunks while the batch has room.
    fn step(&mut self, running: &mut Vec<Sequence<'_>>, free: &mut Vec<usize>) {
        // The plan: (sequence, first token, end), generating sequences first.
        let mut budget = self.runner.max_batch();
        let mut plan: Vec<(usize, usize, usize)> = Vec::with_capacity(running.len());
        for (i, sequence) in running.iter().enumerate() {
            let length = sequence.job.prompt.len();
            if sequence.fed == length {
                plan.push((
                    i,
                    length + sequence.generated - 1,
                    length + sequence.generated,
                ));
                budget = budget.saturating_sub(1);
            }
        }
        let now = Instant::now();
        for (i, sequence) in running.iter_mut().enumerate() {
            let length = sequence.job.prompt.len();
            if sequence.fed < length && budget > 0 {
                let end = length.min(sequence.fed + budget);
                sequence.started.get_or_insert(now);
                plan.push((i, sequence.fed, end));
                budget -= end - sequence.fed;
            }
        }
        let steps: Vec<Step<'_>> = plan
            .iter()
            .map(|&(i, start, end)| {
                let sequence = &running[i];
                let length = sequence.job.prompt.len();
                let tokens = if start < length {
                    &sequence.job.prompt[start..end]
                } else {
                    std::slice::from_ref(&sequence.next)
                };
                Step {
                    slot: sequence.slot,
                    position: start,
                    tokens,
                    logits: end >= length,
                }
            })
            .collect();
        let chunks: Vec<(usize, usize, bool)> = steps
            .iter()
            .zip(&plan)
            .map(|(step, &(i, _, _))| (i, step.tokens.len(), step.logits))
            .collect();
        let runner = &mut self.runner;
        let outcome = guarded(move || runner.forward(&steps));
        let logits = match outcome {
            Ok(logits) => logits,
            Err(err) => {
                // Every sequence of the batch fails; their caches may be half
                // written, so their slots start afresh.
                let err = match err {
                    Error::ShutDown => Error::ShutDown,
                    err => {
                        tracing::warn!(error = %err, "a batch failed");
                        err
                    }
                };
                for sequence in running.drain(..) {
                    let _ = sequence.job.events.send(Err(clone_error(&err)));
                    self.runner.release(sequence.slot);
                    free.push(sequence.slot);
                }
                return;
            }
        };
        let vocab = logits.len() / chunks.iter().filter(|c| c.2).count().max(1);
        let mut rows = logits.chunks_exact(vocab.max(1));
        let mut done = vec![false; running.len()];
        for (i, tokens, wants_logits) in chunks {
            let sequence = &mut running[i];
            if sequence.fed < sequence.job.prompt.len() {
                sequence.fed += tokens;
            }
            if !wants_logits {
                continue;
            }
            let Some(row) = rows.next() else { break };
            let progress = match sequence.draw(row, &self.model) {
                Ok(token) => sequence.advance(token, &self.model),
                Err(err) => {
                    let _ = sequence.job.events.send(Err(err));
                    Ok(Progress::Finished)
                }
            };
            match progress {
                Ok(Progress::Continue) => {}
                Ok(Progress::Finished | Progress::Cancelled) => done[i] = true,
                Err(err) => {
                    let _ = sequence.job.events.send(Err(err));
                    done[i] = true;
                }
            }
        }
        let mut index = 0;
        running.retain(|sequence| {
            let keep = !done[index];
            index += 1;
            if !keep {
                self.runner.release(sequence.slot);
                free.push(sequence.slot);
            }
            keep
        });
    }
}

impl Sequence<'_> {
    /// Samples the next token from `logits`; a structured answer's grammar
    /// masks them first and takes the token.
    /// Asked for, the token's log-probabilities come from the logits as the
    /// model gave them.
    fn draw(&mut self, logits: &[f32], model: &LoadedModel) -> Result<u32> {
        let token = match self.job.constraint.as_mut() {
            None => sample(&mut self.sampler, logits)?,
            Some(constraint) => {
                let mut masked = logits.to_vec();
                constraint.mask(&mut masked)?;
                let token = sample(&mut self.sampler, &masked)?;
                constraint.consume(token)?;
                token
            }
        };
        if let Some(top) = self.job.logprobs {
            let words = model.grammars.words(&model.tokenizer)?;
            self.logprob = Some(crate::logprobs::entry(logits, token, top, words));
        }
        Ok(token)
    }

    /// Takes the token just sampled: sends its text, or finishes.
    fn advance(&mut self, token: u32, model: &LoadedModel) -> Result<Progress> {
        if self.decode_started.is_none() {
            self.prefill = self.started.map_or(Duration::ZERO, |s| s.elapsed());
            self.decode_started = Some(Instant::now());
        }
        let events = &self.job.events;
        if events.is_closed() {
            return Ok(Progress::Cancelled);
        }
        let finish = if model.tokenizer.end_tokens.contains(&token) {
            Some(FinishReason::Stop)
        } else {
            self.generated += 1;
            self.generated_total.fetch_add(1, Ordering::Relaxed);
            self.next = token;
            // A token of the answer (an end token is none).
            if let Some(entry) = self.logprob.take()
                && events.send(Ok(StreamEvent::Logprobs(vec![entry]))).is_err()
            {
                return Ok(Progress::Cancelled);
            }
            let piece = self
                .decoder
                .step(token)
                .map_err(|err| Error::engine("error decoding a token", err))?;
            let (ready, stopped) = self.stops.push(piece.as_deref().unwrap_or(""));
            if !ready.is_empty() && events.send(Ok(StreamEvent::Delta(ready))).is_err() {
                return Ok(Progress::Cancelled);
            }
            // A structured answer ends where its grammar is complete.
            let complete = self
                .job
                .constraint
                .as_ref()
                .is_some_and(|constraint| constraint.is_complete());
            if stopped || complete {
                Some(FinishReason::Stop)
            } else if self.generated >= self.job.max_tokens {
                Some(FinishReason::Length)
            } else {
                None
            }
        };
        let Some(finish) = finish else {
            return Ok(Progress::Continue);
        };
        let rest = self.stops.finish();
        if !rest.is_empty() && events.send(Ok(StreamEvent::Delta(rest))).is_err() {
            return Ok(Progress::Cancelled);
        }
        let prompt = self.job.prompt.len() as u64;
        let decode = self.decode_started.map_or(Duration::ZERO, |s| s.elapsed());
        let _ = events.send(Ok(StreamEvent::Finished {
            finish_reason: Some(finish),
            usage: Some(Usage::new(prompt, self.generated as u64)),
            timings: Some(Timings::from_phases(
                self.prefill,
                prompt,
                decode,
                self.generated.saturating_sub(1) as u64,
            )),
        }));
        Ok(Progress::Finished)
    }
}

/// The same error for each sequence of a failed batch.
pub(crate) fn clone_error(err: &Error) -> Error {
    match err {
        Error::ShutDown => Error::ShutDown,
        err => Error::engine("the batch failed", std::io::Error::other(err.to_string())),
    }
}

/// Runs one generation, turning a panic into an error: a panicking step must
/// neither take its worker down (the pool would shrink for good) nor end its
/// stream without a word (its reader would take a cut-off answer for a whole
/// one).
pub(crate) fn guarded<T>(generate: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(AssertUnwindSafe(generate)) {
        Ok(outcome) => outcome,
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".to_owned());
            Err(Error::engine(
                "the generation panicked",
                std::io::Error::other(message),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_generation_becomes_an_error_and_the_caller_goes_on() {
        let outcome: Result<()> = guarded(|| panic!("index out of bounds"));
        let err = outcome.unwrap_err();
        assert!(matches!(err, Error::Engine { .. }), "{err:?}");
        let source = std::error::Error::source(&err).unwrap().to_string();
        assert_eq!(source, "index out of bounds");
        assert_eq!(guarded(|| Ok(7)).unwrap(), 7);
    }
}
