//! Hook points for policy and inspection: request head, request body, response head, response
//! body. Each may let the message go on, rewrite it, or answer from the proxy instead.
//!
//! Heads are given mutably (rewrite headers, URI) and may be answered instead
//! ([`HeadVerdict::Respond`]). Bodies are seen through a [`BodyInspector`] the hook returns for that
//! message: in [`BodyMode::Stream`] it observes chunks as they pass (and can only cut the stream at
//! the end); in [`BodyMode::Hold`] the proxy holds the whole body (up to a bound) before anything
//! is sent on, so the verdict can pass it, replace it, or answer instead: an upload can be refused
//! before any byte reaches the app.

use bytes::Bytes;
use http::{Response, request, response};

use super::{body::ProxyBody, catalog::App};
use crate::steer::OriginRecord;

/// What a hook knows about the exchange.
#[derive(Debug)]
pub struct Exchange<'a> {
    /// Who opened the connection and where to.
    pub origin: &'a OriginRecord,
    /// The client's address as accepted.
    pub peer: std::net::SocketAddr,
    /// The catalogued app.
    pub app: &'a App,
    /// The host (SNI, or Host for plain HTTP).
    pub host: &'a str,
    /// Unique id of this request (also the incident id of any page the proxy answers with).
    pub request_id: &'a str,
    /// Per-request state the hooks keep between their calls (set once, typically by
    /// [`Hooks::request_head`]). Dropped when the proxy is done with the request head, which
    /// is after every hook of the request ran.
    pub state: &'a RequestState,
}

/// A slot for one value per request, shared by the hook calls of that request.
#[derive(Default)]
pub struct RequestState(std::sync::OnceLock<Box<dyn std::any::Any + Send + Sync>>);

impl std::fmt::Debug for RequestState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "RequestState(set)"
        } else {
            "RequestState(empty)"
        })
    }
}

impl RequestState {
    /// Stores `value`; false when the slot was already set.
    pub fn set<T: std::any::Any + Send + Sync>(&self, value: T) -> bool {
        self.0.set(Box::new(value)).is_ok()
    }
    /// The stored value, when it is a `T`.
    pub fn get<T: std::any::Any>(&self) -> Option<&T> {
        self.0.get().and_then(|b| b.downcast_ref::<T>())
    }
}

/// A head hook's verdict.
#[derive(Debug)]
pub enum HeadVerdict {
    /// Go on with the (possibly rewritten) head.
    Continue,
    /// Answer with this response instead.
    Respond(Response<ProxyBody>),
}

/// How a body is inspected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyMode {
    /// Chunks are observed as they stream through.
    Stream,
    /// The body is held until its end (at most `limit` bytes) and judged whole.
    Hold {
        /// The most bytes held; beyond it [`BodyInspector::overflow`] decides.
        limit: usize,
    },
}

/// A body verdict.
#[derive(Debug)]
pub enum BodyVerdict {
    /// Send the body on as it is.
    Pass,
    /// Send these bytes instead (held bodies only).
    Replace(Bytes),
    /// Answer with this response instead (held bodies only; a streamed body is cut).
    Respond(Response<ProxyBody>),
}

/// Sees one message body.
pub trait BodyInspector: Send {
    /// Streaming or held.
    fn mode(&self) -> BodyMode;
    /// A chunk of the body, in order.
    fn chunk(&mut self, data: &Bytes);
    /// The body ended.
    fn end(&mut self) -> BodyVerdict;
    /// A held body is complete: the whole of it, once, so an inspector need not keep copies of
    /// the chunks. By default the verdict is [`BodyInspector::end`]'s.
    fn held(&mut self, body: &Bytes) -> BodyVerdict {
        let _ = body;
        self.end()
    }
    /// A held body grew past its bound. `Pass` sends it on uninspected (what was held first, then
    /// the rest as it streams); other verdicts answer instead.
    fn overflow(&mut self) -> BodyVerdict {
        BodyVerdict::Pass
    }
}

/// The hook points. Every method has a pass-through default.
pub trait Hooks: Send + Sync + 'static {
    /// False when no hook does anything: the proxy then skips the hook calls and the copies of
    /// the request head they would need.
    fn active(&self) -> bool {
        true
    }
    /// The request head, before anything is sent upstream.
    fn request_head(&self, _ex: &Exchange<'_>, _head: &mut request::Parts) -> HeadVerdict {
        HeadVerdict::Continue
    }
    /// An inspector for the request body, if this request's body should be seen.
    fn request_body(
        &self,
        _ex: &Exchange<'_>,
        _head: &request::Parts,
    ) -> Option<Box<dyn BodyInspector>> {
        None
    }
    /// The response head, before anything is sent to the client.
    fn response_head(
        &self,
        _ex: &Exchange<'_>,
        _req: &request::Parts,
        _head: &mut response::Parts,
    ) -> HeadVerdict {
        HeadVerdict::Continue
    }
    /// An inspector for the response body.
    fn response_body(
        &self,
        _ex: &Exchange<'_>,
        _req: &request::Parts,
        _head: &response::Parts,
    ) -> Option<Box<dyn BodyInspector>> {
        None
    }
}

/// Hooks that let everything through.
#[derive(Debug, Default)]
pub struct PassThrough;

impl Hooks for PassThrough {
    fn active(&self) -> bool {
        false
    }
}
