//! [`Runner`]: what the scheduler runs a batch of steps on, our forward pass
//! or candle's models, each slot with its own cache.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::{llama, quantized_llama};
use runtime_core::{Error, Result};

use crate::gemma3::Gemma3Session;
use crate::model::{Weights, engine_err};
use crate::native::{self, Step};

/// What the engine's scheduler runs a batch on.
pub(crate) enum Runner {
    /// Our forward pass: true batches over all slots.
    Native(Box<native::Forward>),
    /// candle's models: one step after another, each slot with its own session.
    Candle {
        sessions: Vec<Session>,
        pool: rayon::ThreadPool,
        logits: Vec<f32>,
    },
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Native(runner) => runner.fmt(f),
            Self::Candle { sessions, .. } => f
                .debug_struct("Candle")
                .field("slots", &sessions.len())
                .finish(),
        }
    }
}

impl Runner {
    /// A runner for `slots` sequences on `threads` threads; a forward pass
    /// of ours ends early once `stop` is set.
    pub(crate) fn new(
        weights: &Weights,
        slots: usize,
        threads: usize,
        cache: crate::CacheType,
        stop: Arc<AtomicBool>,
    ) -> Result<Self> {
        if let Weights::Native(model) = weights {
            let runner = native::Forward::new(model.clone(), slots, threads, cache, stop)?;
            return Ok(Self::Native(Box::new(runner)));
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name(|i| format!("candle-compute-{i}"))
            .build()
            .map_err(|err| Error::engine("error starting the compute pool", err))?;
        let sessions = (0..slots)
            .map(|_| Session::new(weights))
            .collect::<Result<_>>()?;
        Ok(Self::Candle {
            sessions,
            pool,
            logits: Vec::new(),
        })
    }

    /// Prompt tokens one step may carry: ours chunks long prompts, candle's
    /// models take a prompt whole.
    pub(crate) fn max_batch(&self) -> usize {
        match self {
            Self::Native(_) => native::MAX_BATCH,
            Self::Candle { .. } => usize::MAX,
        }
    }

    /// Runs `steps` and returns the logits of those that want them, one row each.
    pub(crate) fn forward(&mut self, steps: &[Step<'_>]) -> Result<&[f32]> {
        match self {
            Self::Native(runner) => runner.forward(steps),
            Self::Candle {
                sessions,
                pool,
                logits,
            } => {
                logits.clear();
                for step in steps {
                    let session = sessions.get_mut(step.slot).ok_or_else(|| {
                        Error::engine(
                            "a batch names a slot that does not exist",
                            std::io::Error::other(format!("slot {}", step.slot)),
                        )
                    })?;
                    if step.position == 0 {
                        session.reset()?;
                    }
                    let row = pool.install(|| session.forward(step.tokens, step.position))?;
                    if step.logits {
                        let row = row
                            .to_dtype(DType::F32)
                            .and_then(|row| row.to_vec1::<f32>())
                            .map_err(engine_err("error reading the logits"))?;
                        logits.extend_from_slice(&row);
                    }
                }
                Ok(logits)
            }
        }
    }

    /// The sequence in `slot` is done.
    pub(crate) fn release(&mut self, slot: usize) {
        match self {
            Self::Native(runner) => runner.release(slot),
            Self::Candle { sessions, .. } => {
                if let Some(session) = sessions.get_mut(slot) {
                    // The quantized model resets at position 0 by itself.
                    let _ = session.reset();
                }
            }
        }
    }
}

/// One slot of a candle model: the shared weights plus its own KV cache.
pub(crate) enum Session {
    Gemma3(Gemma3Session),
    Quantized(Box<quantized_llama::ModelWeights>),
    Llama {
        model: Arc<llama::Llama>,
        config: Box<llama::Config>,
        cache: llama::Cache,
    },
}

impl Session {
    fn new(weights: &Weights) -> Result<Self> {
        Ok(match weights {
            Weights::Native(_) => {
                return Err(Error::engine(
                    "a candle session over weights of our own forward pass",
                    std::io::Error::other("use Runner::Native"),
                ));
            }
            Weights::Gemma3(model) => Self::Gemma3(Gemma3Session::new(model.clone())),
            Weights::Quantized(weights) => Self::Quantized(weights.clone()),
            Weights::Llama { model, config } => Self::Llama {
                model: model.clone(),
                cache: llama::Cache::new(true, DType::F32, config, &Device::Cpu)
                    .map_err(engine_err("error allocating the KV cache"))?,
                config: config.clone(),
            },
        })
    }

    /// Starts a new sequence (the quantized model resets at position 0 by itself).
    fn reset(&mut self) -> Result<()> {
        match self {
            Self::Llama { cache, config, .. } => {
                *cache = llama::Cache::new(true, DType::F32, config, &Device::Cpu)
                    .map_err(engine_err("error allocating the KV cache"))?;
            }
            Self::Gemma3(session) => session.reset(),
            Self::Quantized(_) => {}
        }
        Ok(())
    }

    /// Logits for the token after `tokens`, which start at position `position`.
    fn forward(&mut self, tokens: &[u32], position: usize) -> Result<Tensor> {
        let input = Tensor::new(tokens, &Device::Cpu)
            .and_then(|t| t.unsqueeze(0))
            .map_err(engine_err("error building the input tensor"))?;
        let logits = match self {
            Self::Gemma3(session) => session.forward(&input, position),
            Self::Quantized(weights) => weights.forward(&input, position),
            Self::Llama { model, cache, .. } => model.forward(&input, position, cache),
        }
        .map_err(engine_err("error running the model"))?;
        logits
            .squeeze(0)
            .map_err(engine_err("unexpected logits shape"))
    }
}
