//! Which model a request's name (or alias) means.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use runtime_core::{Error, Result};

use super::Inner;
use super::model::Model;

/// The models by name, and every name (aliases too) to its model's name.
#[derive(Default)]
pub(super) struct Routes {
    pub(super) by_name: BTreeMap<String, Arc<Model>>,
    pub(super) names: HashMap<String, String>,
}

impl Routes {
    pub(super) fn build(models: impl Iterator<Item = Arc<Model>>) -> Self {
        let mut routes = Self::default();
        for model in models {
            let name = model.name().to_owned();
            for alias in std::iter::once(&name).chain(&model.spec.aliases) {
                routes.names.insert(alias.clone(), name.clone());
            }
            routes.by_name.insert(name, model);
        }
        routes
    }
}

impl Inner {
    /// The model a request names (or the default model), or a 404 error
    /// listing what exists.
    pub(super) fn resolve(&self, requested: Option<&str>) -> Result<Arc<Model>> {
        let routes = self.routes();
        let default = self.settings().default_model.clone();
        let wanted = requested.map(str::to_owned).or(default);
        let found = wanted
            .as_ref()
            .and_then(|name| routes.names.get(name))
            .and_then(|name| routes.by_name.get(name));
        match found {
            Some(model) => Ok(model.clone()),
            None => Err(Error::ModelNotServed {
                requested: wanted.unwrap_or_else(|| "(none)".to_owned()),
                available: {
                    let mut names: Vec<String> = routes.names.keys().cloned().collect();
                    names.sort_unstable();
                    names
                },
            }),
        }
    }
}
