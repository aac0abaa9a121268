//! Parts of the `sluice-collector` command that are more than a call into the library.

pub mod status;
