//! Small network building blocks that the agent, the policy engine and the collector share:
//! address blocks ([`Cidr`]), host patterns ([`HostPattern`]), a stream wrapper that notes when
//! bytes last moved ([`idle`]), and the parse of a TLS ClientHello ([`hello`]).
//!
//! Imports nothing of Sluice's own: everything above it may depend on it.

mod cidr;
pub mod hello;
mod host;
pub mod idle;

pub use cidr::Cidr;
pub use host::HostPattern;
