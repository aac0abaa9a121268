//! Small network building blocks that the agent, the policy engine and the collector share:
//! address blocks ([`Cidr`]), host patterns ([`HostPattern`]), a stream wrapper that notes when
//! bytes last moved ([`idle`]), the parse of a TLS ClientHello ([`hello`]), of DNS answers
//! ([`dns`]), ICAP's wire format ([`icap`]) and a TLS 1.3 record layer that takes
//! over sessions rustls has set up ([`records`]).
//!
//! Imports nothing of Sluice's own: everything above it may depend on it.

mod cidr;
pub mod dns;
pub mod hello;
mod host;
pub mod icap;
pub mod idle;
pub mod records;

pub use cidr::Cidr;
pub use host::HostPattern;
