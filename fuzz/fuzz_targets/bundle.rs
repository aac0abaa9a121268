//! Signed policy bundles: the unpack of the gzipped tarball before anything is trusted, the
//! signature check of what it holds, and (re-signed with a key of the fuzzer's, to get past the
//! signature) the signed file list and the manifest. An archive that unpacks stays within its
//! bounds and writes back to the same files; one signed here verifies unless its manifest is bad.
//! The same bytes are also read as the rotation proofs a privileged part reads from the proxy's
//! state (`rotations.json`) and learnt from: never a panic, and nothing learnt without a valid
//! signature by the key trusted.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::{fuzz_mutator, fuzz_target};
use sluice_policy::bundle::{
    Archive, BundleError, Limits, RotationProof, SIGNATURES, Trust,
    jws::{SigningKey, VerifyingKey},
};

/// A key made once per run: the fuzzer signs with it what it unpacked.
static KEYS: LazyLock<Option<(SigningKey, VerifyingKey)>> = LazyLock::new(|| {
    let (key, _, public) = SigningKey::generate().ok()?;
    Some((key, VerifyingKey::from_pem(&public).ok()?))
});

/// The agent's bounds, scaled down for speed.
const LIMITS: Limits = Limits {
    max_archive: 1 << 20,
    max_total: 4 << 20,
    max_file: 1 << 20,
    max_files: 1_000,
};

fuzz_target!(|data: &[u8]| {
    if data.len() as u64 > LIMITS.max_archive {
        return;
    }
    let Some((key, public)) = KEYS.as_ref() else {
        panic!("no signing key");
    };
    if let Ok(proofs) = serde_json::from_slice::<Vec<RotationProof>>(data) {
        let mut trust = Trust::default();
        assert!(
            !trust.catch_up(public, &proofs),
            "learnt a rotation nobody signed with the trusted key"
        );
    }
    let Ok(archive) = Archive::read(data, &LIMITS) else {
        return;
    };
    let total: usize = archive.files.values().map(Vec::len).sum();
    assert!(!archive.files.is_empty() && archive.files.len() <= LIMITS.max_files);
    assert!(total as u64 <= LIMITS.max_total);
    for name in archive.files.keys() {
        assert!(
            !name.is_empty()
                && !name.starts_with('/')
                && name
                    .split('/')
                    .all(|p| !p.is_empty() && p != "." && p != ".."),
            "unsafe name {name:?}"
        );
    }
    let written = archive.write().expect("an unpacked archive writes");
    assert_eq!(
        Archive::read(&written, &Limits::default()).expect("a written archive reads"),
        archive
    );
    // As it came: its own signature (almost never one of this key's).
    let _ = archive.clone().verify(public);
    // Signed here: only the manifest can be wrong.
    let mut signed = archive;
    signed.files.remove(SIGNATURES);
    if signed.files.is_empty() {
        return;
    }
    signed.sign(key).expect("signing");
    match signed.verify(public) {
        Ok(v) => {
            assert!(v.manifest.revision_number().is_ok() && v.manifest.expires_at.is_some());
            let _ = v.rotation();
        }
        Err(BundleError::Manifest(_)) => {}
        Err(e) => panic!("a bundle signed here does not verify: {e}"),
    }
});

fuzz_mutator!(|data: &mut [u8], size: usize, max_size: usize, seed: u32| {
    sluice_fuzz::mutate_bundle(data, size, max_size, seed)
});
