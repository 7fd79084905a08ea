//! [`ResetGuardLayer`]: builds the guard around a service and swaps its settings live.

use std::sync::Arc;

use arc_swap::ArcSwap;
use tower::Layer;

use crate::config::GuardSettings;
use crate::secret::ApiKey;
use crate::service::ResetGuard;

/// What every clone of the guard reads on each request.
#[derive(Debug)]
pub(crate) struct GuardState {
    pub(crate) settings: GuardSettings,
    pub(crate) api_key: ApiKey,
}

/// Guards the QuickBlox password-reset path. See the [crate docs](crate) for an example.
#[derive(Debug, Clone)]
pub struct ResetGuardLayer {
    state: Arc<ArcSwap<GuardState>>,
}

impl ResetGuardLayer {
    /// A guard with these settings that sends `api_key` upstream in place of client tokens.
    pub fn new(settings: GuardSettings, api_key: ApiKey) -> Self {
        ResetGuardLayer {
            state: Arc::new(ArcSwap::from_pointee(GuardState { settings, api_key })),
        }
    }

    /// A handle that replaces the settings of every service this layer built.
    pub fn handle(&self) -> GuardHandle {
        GuardHandle {
            state: self.state.clone(),
        }
    }
}

impl<S> Layer<S> for ResetGuardLayer {
    type Service = ResetGuard<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ResetGuard::new(inner, self.state.clone())
    }
}

/// Swaps the running guard's settings and key (config reload, key rotation).
/// Requests already inside the guard finish with the settings they started with.
#[derive(Debug, Clone)]
pub struct GuardHandle {
    state: Arc<ArcSwap<GuardState>>,
}

impl GuardHandle {
    /// Applies new settings and key to every request from now on.
    pub fn update(&self, settings: GuardSettings, api_key: ApiKey) {
        self.state.store(Arc::new(GuardState { settings, api_key }));
    }

    /// The settings in force.
    pub fn settings(&self) -> GuardSettings {
        self.state.load().settings.clone()
    }
}
