//! The slots' KV caches, in the precision configured.

use half::f16;

use crate::CacheType;
use crate::kernels::CacheValue;

/// A slot's keys and values, per layer: `position × kv_dim` values each.
#[derive(Debug)]
pub(super) struct SlotCache<T> {
    pub(super) keys: Vec<Vec<T>>,
    pub(super) values: Vec<Vec<T>>,
}

impl<T: CacheValue> SlotCache<T> {
    pub(super) fn new(layers: usize) -> Self {
        Self {
            keys: vec![Vec::new(); layers],
            values: vec![Vec::new(); layers],
        }
    }

    /// Positions held.
    pub(super) fn positions(&self, kv_dim: usize) -> usize {
        self.keys[0].len() / kv_dim
    }

    /// Frees all but `keep` values of each layer's memory.
    pub(super) fn release(&mut self, keep: usize) {
        for v in self.keys.iter_mut().chain(self.values.iter_mut()) {
            v.clear();
            v.shrink_to(keep);
        }
    }
}

/// The slots' caches, in the precision configured.
#[derive(Debug)]
pub(super) enum Caches {
    F16(Vec<SlotCache<f16>>),
    F32(Vec<SlotCache<f32>>),
}

impl Caches {
    pub(super) fn new(cache: CacheType, slots: usize, layers: usize) -> Self {
        match cache {
            CacheType::F32 => Self::F32((0..slots).map(|_| SlotCache::new(layers)).collect()),
            _ => Self::F16((0..slots).map(|_| SlotCache::new(layers)).collect()),
        }
    }

    pub(super) fn slots(&self) -> usize {
        match self {
            Self::F16(s) => s.len(),
            Self::F32(s) => s.len(),
        }
    }

    pub(super) fn positions(&self, slot: usize, kv_dim: usize) -> usize {
        match self {
            Self::F16(s) => s[slot].positions(kv_dim),
            Self::F32(s) => s[slot].positions(kv_dim),
        }
    }

    pub(super) fn release(&mut self, slot: usize, keep: usize) {
        match self {
            Self::F16(s) => s[slot].release(keep),
            Self::F32(s) => s[slot].release(keep),
        }
    }
}
