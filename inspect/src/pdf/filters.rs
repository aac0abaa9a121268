//! Stream filters: Flate with PNG and TIFF predictors, ASCIIHex, ASCII85.

use super::*;

/// Undoes a PNG (10..15) or TIFF (2, 8 bits per component) predictor.
pub(super) fn unpredict(data: Vec<u8>, parms: &Dict) -> Result<Vec<u8>> {
    let int = |key: &[u8], default: usize| match parms.get(key) {
        None => Ok(default),
        Some(v) => v
            .as_usize()
            .ok_or_else(|| malformed("bad predictor parameter")),
    };
    let predictor = int(b"Predictor", 1)?;
    if predictor <= 1 {
        return Ok(data);
    }
    let colors = int(b"Colors", 1)?;
    let bpc = int(b"BitsPerComponent", 8)?;
    let columns = int(b"Columns", 1)?;
    if !(1..=32).contains(&colors) || ![1, 2, 4, 8, 16].contains(&bpc) {
        return Err(malformed("bad predictor parameters"));
    }
    let bits = colors * bpc;
    let bpp = (bits / 8).max(1);
    let row = bits
        .checked_mul(columns)
        .map(|b| b.div_ceil(8))
        .filter(|&r| (1..=MAX_PREDICTOR_ROW).contains(&r))
        .ok_or_else(|| malformed("bad predictor /Columns"))?;
    if predictor == 2 {
        if bpc != 8 {
            return Err(malformed(
                "TIFF predictor with other than 8 bits per component",
            ));
        }
        let mut data = data;
        for line in data.chunks_mut(row) {
            for i in bpp..line.len() {
                line[i] = line[i].wrapping_add(line[i - bpp]);
            }
        }
        return Ok(data);
    }
    if predictor < 10 {
        return Err(malformed(format!("unsupported predictor {predictor}")));
    }
    let mut out = Vec::with_capacity(data.len());
    let mut prev = vec![0u8; row];
    for line in data.chunks_exact(row + 1) {
        let mut cur = line[1..].to_vec();
        match line[0] {
            0 => {}
            1 => {
                for i in bpp..row {
                    cur[i] = cur[i].wrapping_add(cur[i - bpp]);
                }
            }
            2 => {
                for (c, p) in cur.iter_mut().zip(&prev) {
                    *c = c.wrapping_add(*p);
                }
            }
            3 => {
                for i in 0..row {
                    let left = if i >= bpp { cur[i - bpp] } else { 0 };
                    let avg = ((u16::from(left) + u16::from(prev[i])) / 2) as u8;
                    cur[i] = cur[i].wrapping_add(avg);
                }
            }
            4 => {
                for i in 0..row {
                    let a = if i >= bpp { cur[i - bpp] } else { 0 };
                    let c = if i >= bpp { prev[i - bpp] } else { 0 };
                    cur[i] = cur[i].wrapping_add(paeth(a, prev[i], c));
                }
            }
            t => return Err(malformed(format!("bad PNG predictor row type {t}"))),
        }
        out.extend_from_slice(&cur);
        prev = cur;
    }
    Ok(out)
}

pub(super) fn paeth(a: u8, b: u8, c: u8) -> u8 {
    let p = i16::from(a) + i16::from(b) - i16::from(c);
    let (pa, pb, pc) = (
        (p - i16::from(a)).abs(),
        (p - i16::from(b)).abs(),
        (p - i16::from(c)).abs(),
    );
    if pa <= pb && pa <= pc {
        a
    } else if pb <= pc {
        b
    } else {
        c
    }
}

pub(super) fn ascii_hex(data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(data.len() / 2);
    let mut high: Option<u8> = None;
    for &b in data {
        if b == b'>' {
            break;
        }
        if is_ws(b) {
            continue;
        }
        let v = hex_val(b).ok_or_else(|| malformed("bad ASCIIHex data"))?;
        match high.take() {
            Some(h) => out.push(h << 4 | v),
            None => high = Some(v),
        }
    }
    if let Some(h) = high {
        out.push(h << 4);
    }
    Ok(out)
}

pub(super) fn ascii85(data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(data.len() / 5 * 4);
    let mut group = [0u8; 5];
    let mut n = 0;
    let mut bytes = data.iter().copied();
    if data.starts_with(b"<~") {
        bytes.nth(1);
    }
    for b in bytes {
        match b {
            b'~' => break,
            b'z' if n == 0 => out.extend_from_slice(&[0; 4]),
            b'!'..=b'u' => {
                group[n] = b - b'!';
                n += 1;
                if n == 5 {
                    out.extend_from_slice(&a85_group(&group)?);
                    n = 0;
                }
            }
            _ if is_ws(b) => {}
            _ => return Err(malformed("bad ASCII85 data")),
        }
    }
    if n == 1 {
        return Err(malformed("bad ASCII85 final group"));
    }
    if n > 1 {
        group[n..].fill(84);
        let full = a85_group(&group)?;
        out.extend_from_slice(&full[..n - 1]);
    }
    Ok(out)
}

pub(super) fn a85_group(group: &[u8; 5]) -> Result<[u8; 4]> {
    let v = group.iter().fold(0u64, |v, &d| v * 85 + u64::from(d));
    u32::try_from(v)
        .map(u32::to_be_bytes)
        .map_err(|_| malformed("ASCII85 group out of range"))
}
