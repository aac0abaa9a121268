//! Hook points for policy and inspection, as one typed lifecycle per request.
//!
//! [`Hooks::begin`] gives the proxy a [`Flow`]: the request's own context, owned by the proxy
//! (no shared state, no lock around it) and passed through the request head, the request body,
//! the response head and the response body, then ended by [`Flow::finish`], which returns the
//! request's activity event so that the proxy reports it together with the request record.
//!
//! Heads are given mutably (rewrite headers, URI) and may be answered instead
//! ([`HeadVerdict::Respond`]). A body is either passed through untouched or held whole (up to a
//! bound) and judged: the verdict can pass it, replace it, or answer instead, so an upload can be
//! refused before any byte reaches the app. Judging parses and scans, so the proxy calls
//! [`Flow::judge`] on its bounded inspection pool, never on the async workers; the held bytes
//! count against one global budget.

use bytes::Bytes;
use http::{Response, request, response};

use super::{body::ProxyBody, catalog::App};
use crate::{event::ActivityEvent, steer::OriginRecord};

/// In a request head's extensions: the request has no body (HTTP/1 without a length or chunks,
/// HTTP/2 ending its stream with its headers), whatever its method.
#[derive(Debug, Clone, Copy)]
pub struct NoBody;

/// In a request head's extensions: the request asks to become a WebSocket (what follows it is
/// relayed, not inspected).
#[derive(Debug, Clone, Copy)]
pub struct WebSocket;

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
}

/// A head hook's verdict.
#[derive(Debug)]
pub enum HeadVerdict {
    /// Go on with the (possibly rewritten) head.
    Continue,
    /// Answer with this response instead.
    Respond(Response<ProxyBody>),
}

/// What the proxy does with a body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyPlan {
    /// Send it on as it streams; the flow does not see it.
    Pass,
    /// Hold it until its end (at most `limit` bytes) and judge it whole.
    Hold {
        /// The most bytes held; beyond it [`Flow::unheld`] decides.
        limit: usize,
    },
}

/// Which body is judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The request body (an upload).
    Request,
    /// The response body (a download).
    Response,
}

/// Why a body meant to be held was not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unheld {
    /// It grew past the flow's bound; `seen` bytes had arrived.
    TooLarge {
        /// Bytes seen when the bound was crossed.
        seen: u64,
    },
    /// The global inspection budget stayed spent for longer than the proxy waits.
    Busy {
        /// Bytes seen when the proxy gave up waiting.
        seen: u64,
    },
    /// The request's user already holds their share of the inspection budget.
    UserBusy {
        /// Bytes seen when the share ran out.
        seen: u64,
    },
}

/// A body verdict.
#[derive(Debug)]
pub enum BodyVerdict {
    /// Send the body on as it is.
    Pass,
    /// Send these bytes instead.
    Replace(Bytes),
    /// Answer with this response instead.
    Respond(Response<ProxyBody>),
}

/// How a request ended, for [`Flow::finish`].
#[derive(Debug, Clone, Copy)]
pub struct Ended {
    /// The status the origin answered (0: it was not asked, or did not answer).
    pub origin_status: u16,
    /// The status sent to the client (0: the client went away first).
    pub status: u16,
}

/// One request's controls: created by [`Hooks::begin`], owned by the proxy until
/// [`Flow::finish`]. Every method but `finish` has a pass-through default.
pub trait Flow: Send + 'static {
    /// The request head, before anything is sent upstream.
    fn request_head(&mut self, _head: &mut request::Parts) -> HeadVerdict {
        HeadVerdict::Continue
    }
    /// What to do with the request body (called after [`Flow::request_head`] continued).
    fn request_body(&mut self, _head: &request::Parts) -> BodyPlan {
        BodyPlan::Pass
    }
    /// The response head, before anything is sent to the client.
    fn response_head(&mut self, _head: &mut response::Parts) -> HeadVerdict {
        HeadVerdict::Continue
    }
    /// What to do with the response body.
    fn response_body(&mut self, _head: &response::Parts) -> BodyPlan {
        BodyPlan::Pass
    }
    /// A held body, whole. Runs on the inspection pool: it may parse and scan, but must not wait
    /// on the proxy's async tasks.
    fn judge(&mut self, _side: Side, _body: &Bytes) -> BodyVerdict {
        BodyVerdict::Pass
    }
    /// Headers added to the response once its body was judged (what the judgement wrote into
    /// the body may need saying: where a protected file's password is released).
    fn judged_response_headers(&mut self) -> http::HeaderMap {
        http::HeaderMap::new()
    }
    /// A body that was to be held was not (too large, or the inspection budget was spent).
    /// `Pass` sends it on uninspected (what was held first, then the rest as it streams); other
    /// verdicts answer instead.
    fn unheld(&mut self, _side: Side, _why: Unheld) -> BodyVerdict {
        BodyVerdict::Pass
    }
    /// The request is over (answered, delivered or cut): the activity event, built once from the
    /// decisions taken.
    fn finish(self: Box<Self>, ended: Ended) -> Option<ActivityEvent>;
}

/// The hook points.
pub trait Hooks: Send + Sync + 'static {
    /// False when no hook does anything: the proxy then skips the hooks and the work they would
    /// need.
    fn active(&self) -> bool {
        true
    }
    /// A new request on an intercepted connection: its flow, or `None` when it is not looked at.
    fn begin(&self, ex: &Exchange<'_>, head: &request::Parts) -> Option<Box<dyn Flow>>;
}

/// Hooks that let everything through.
#[derive(Debug, Default)]
pub struct PassThrough;

impl Hooks for PassThrough {
    fn active(&self) -> bool {
        false
    }
    fn begin(&self, _ex: &Exchange<'_>, _head: &request::Parts) -> Option<Box<dyn Flow>> {
        None
    }
}
