//! Where an address is: a MaxMind DB (GeoIP2/GeoLite2 City or Country) read whole into memory
//! at start, and the great-circle distance between two places. Behind the new-country and
//! impossible-travel detectors; only an operator-supplied database is used (nothing is fetched).

use std::{net::IpAddr, path::Path};

use serde::Deserialize;

/// Errors of opening the database.
#[derive(Debug, thiserror::Error)]
pub enum GeoError {
    /// The file could not be read or is not a MaxMind DB.
    #[error("{path}: {detail}")]
    Open {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        detail: String,
    },
}

/// What a lookup found.
#[derive(Debug, Clone, PartialEq)]
pub struct Place {
    /// ISO 3166-1 alpha-2 country code (registered country when no country is given).
    pub country: Option<String>,
    /// The city's English name, when known.
    pub city: Option<String>,
    /// Latitude and longitude (degrees), when the database has them (City databases).
    pub coordinates: Option<(f64, f64)>,
}

impl Place {
    /// `City, CC` / `CC` / `somewhere` for people.
    pub fn label(&self) -> String {
        match (&self.city, &self.country) {
            (Some(c), Some(cc)) => format!("{c}, {cc}"),
            (None, Some(cc)) => cc.clone(),
            (Some(c), None) => c.clone(),
            (None, None) => "an unknown place".into(),
        }
    }
}

// The few fields read from GeoIP2 City / Country records (the rest is skipped).
#[derive(Deserialize)]
struct Record {
    #[serde(default)]
    country: Option<Country>,
    #[serde(default)]
    registered_country: Option<Country>,
    #[serde(default)]
    city: Option<City>,
    #[serde(default)]
    location: Option<Location>,
}
#[derive(Deserialize)]
struct Country {
    #[serde(default)]
    iso_code: Option<String>,
}
#[derive(Deserialize)]
struct City {
    #[serde(default)]
    names: Option<std::collections::BTreeMap<String, String>>,
}
#[derive(Deserialize)]
struct Location {
    #[serde(default)]
    latitude: Option<f64>,
    #[serde(default)]
    longitude: Option<f64>,
}

/// An opened database.
pub struct Geo {
    reader: maxminddb::Reader<Vec<u8>>,
}

impl std::fmt::Debug for Geo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Geo")
            .field("database_type", &self.reader.metadata().database_type)
            .finish()
    }
}

impl Geo {
    /// Reads `path` whole.
    pub fn open(path: &Path) -> Result<Self, GeoError> {
        let reader = maxminddb::Reader::open_readfile(path).map_err(|e| GeoError::Open {
            path: path.to_owned(),
            detail: e.to_string(),
        })?;
        Ok(Self { reader })
    }

    /// Where `ip` is, when the database knows.
    pub fn lookup(&self, ip: IpAddr) -> Option<Place> {
        let r: Record = self.reader.lookup(ip).ok()?.decode().ok()??;
        let country = r
            .country
            .and_then(|c| c.iso_code)
            .or_else(|| r.registered_country.and_then(|c| c.iso_code));
        let city = r
            .city
            .and_then(|c| c.names)
            .and_then(|mut n| n.remove("en"));
        let coordinates = r.location.and_then(|l| match (l.latitude, l.longitude) {
            (Some(a), Some(o)) if a.is_finite() && o.is_finite() => Some((a, o)),
            _ => None,
        });
        if country.is_none() && coordinates.is_none() {
            return None;
        }
        Some(Place {
            country,
            city,
            coordinates,
        })
    }
}

/// Great-circle distance between two (latitude, longitude) points in km (haversine).
pub fn distance_km(a: (f64, f64), b: (f64, f64)) -> f64 {
    const R: f64 = 6371.0;
    let (la1, lo1) = (a.0.to_radians(), a.1.to_radians());
    let (la2, lo2) = (b.0.to_radians(), b.1.to_radians());
    let h = ((la2 - la1) / 2.0).sin().powi(2)
        + la1.cos() * la2.cos() * ((lo2 - lo1) / 2.0).sin().powi(2);
    2.0 * R * h.sqrt().min(1.0).asin()
}

#[cfg(test)]
pub(crate) mod testdb {
    //! A tiny MaxMind DB for tests, written with `maxminddb-writer`.
    #![allow(clippy::unwrap_used)]

    use maxminddb_writer::{Database, metadata::IpVersion, paths::IpAddrWithMask};

    /// `(network, country, city, lat, lon)`.
    pub const PLACES: &[(&str, &str, &str, f64, f64)] = &[
        ("10.1.0.0/16", "DE", "Berlin", 52.52, 13.405),
        ("10.2.0.0/16", "DE", "Munich", 48.137, 11.575),
        ("10.3.0.0/16", "US", "New York", 40.713, -74.006),
        ("10.4.0.0/16", "JP", "Tokyo", 35.676, 139.650),
        ("192.0.2.0/24", "FR", "Paris", 48.857, 2.352),
        ("198.51.100.0/24", "BR", "Sao Paulo", -23.55, -46.633),
        ("203.0.113.0/24", "AU", "Sydney", -33.869, 151.209),
    ];

    #[derive(serde::Serialize)]
    struct Names {
        en: String,
    }
    #[derive(serde::Serialize)]
    struct Country {
        iso_code: String,
    }
    #[derive(serde::Serialize)]
    struct City {
        names: Names,
    }
    #[derive(serde::Serialize)]
    struct Location {
        latitude: f64,
        longitude: f64,
    }
    #[derive(serde::Serialize)]
    struct Record {
        country: Country,
        city: City,
        location: Location,
    }

    /// The database's bytes.
    pub fn bytes() -> Vec<u8> {
        let mut db = Database::default();
        db.metadata.ip_version = IpVersion::V6;
        db.metadata.binary_format_major_version = 2;
        db.metadata.database_type = "Sluice-Test-City".into();
        db.metadata.languages = vec!["en".into()];
        db.metadata.build_epoch = 1_700_000_000;
        for (net, cc, city, lat, lon) in PLACES {
            let v = db
                .insert_value(Record {
                    country: Country {
                        iso_code: (*cc).into(),
                    },
                    city: City {
                        names: Names { en: (*city).into() },
                    },
                    location: Location {
                        latitude: *lat,
                        longitude: *lon,
                    },
                })
                .unwrap();
            // IPv4 networks live under ::/96 in an IPv6 tree.
            let (addr, len) = net.split_once('/').unwrap();
            let v4: std::net::Ipv4Addr = addr.parse().unwrap();
            let mapped = format!(
                "{}/{}",
                std::net::Ipv6Addr::from(u128::from(u32::from(v4))),
                96 + len.parse::<u32>().unwrap()
            );
            db.insert_node(mapped.parse::<IpAddrWithMask>().unwrap(), v);
        }
        let mut out = Vec::new();
        db.write_to(&mut out).unwrap();
        out
    }

    /// Writes the database to `path`.
    pub fn write(path: &std::path::Path) {
        std::fs::write(path, bytes()).unwrap();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn distances() {
        let berlin = (52.52, 13.405);
        let paris = (48.857, 2.352);
        let d = distance_km(berlin, paris);
        assert!((870.0..890.0).contains(&d), "{d}");
        assert!(distance_km(berlin, berlin) < 1e-6);
        let sydney = (-33.869, 151.209);
        assert!(distance_km(berlin, sydney) > 15_000.0);
    }

    #[test]
    fn lookups_in_a_generated_database() {
        let dir = std::env::temp_dir().join(format!("sluice-geo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("test.mmdb");
        testdb::write(&path);
        let g = Geo::open(&path).unwrap();
        let p = g.lookup("10.3.7.9".parse().unwrap()).unwrap();
        assert_eq!(p.country.as_deref(), Some("US"));
        assert_eq!(p.label(), "New York, US");
        let (lat, _) = p.coordinates.unwrap();
        assert!((lat - 40.713).abs() < 1e-9);
        assert_eq!(
            g.lookup("203.0.113.5".parse().unwrap())
                .unwrap()
                .country
                .as_deref(),
            Some("AU")
        );
        assert!(g.lookup("127.0.0.1".parse().unwrap()).is_none());
        assert!(g.lookup("2001:db8::1".parse().unwrap()).is_none());
        assert!(Geo::open(&dir.join("missing.mmdb")).is_err());
        std::fs::write(dir.join("junk.mmdb"), b"not a database").unwrap();
        assert!(Geo::open(&dir.join("junk.mmdb")).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
