//! What a DNS answer says about names: for each name asked, the addresses given for it,
//! following CNAME chains. The agent reads the answers steered processes receive (copied by an
//! eBPF ingress program) and learns from them which addresses belong to catalogued apps.
//!
//! Parsing is `simple-dns`'s (compression pointers, bounds); this module only walks the result.
//! Every message is outside bytes: anything malformed is an error, never a panic.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use simple_dns::{Packet, PacketFlag, rdata::RData};

/// Most CNAME links followed from a question.
const MAX_CHAIN: usize = 8;

/// Why a message was not read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    /// Not a DNS message.
    #[error("malformed DNS message: {0}")]
    Malformed(String),
    /// A query, not a response.
    #[error("not a response")]
    NotResponse,
}

/// For each question of the response `msg`: the name asked (lower case, without the final dot)
/// and the A and AAAA addresses the answer section gives for it, directly or through CNAMEs.
/// Names with no address are left out.
pub fn answers(msg: &[u8]) -> Result<Vec<(String, Vec<IpAddr>)>, DnsError> {
    let p = Packet::parse(msg).map_err(|e| DnsError::Malformed(e.to_string()))?;
    if !p.has_flags(PacketFlag::RESPONSE) {
        return Err(DnsError::NotResponse);
    }
    let norm = |n: String| n.trim_end_matches('.').to_ascii_lowercase();
    let records: Vec<(String, &RData<'_>)> = p
        .answers
        .iter()
        .map(|r| (norm(r.name.to_string()), &r.rdata))
        .collect();
    let mut out = Vec::new();
    for q in &p.questions {
        let asked = norm(q.qname.to_string());
        let mut names = vec![asked.clone()];
        // Follow the chain: each CNAME whose owner is a name reached adds its target.
        for _ in 0..MAX_CHAIN {
            let mut grew = false;
            for (owner, rdata) in &records {
                if let RData::CNAME(target) = rdata
                    && names.contains(owner)
                {
                    let t = norm(target.0.to_string());
                    if !names.contains(&t) {
                        names.push(t);
                        grew = true;
                    }
                }
            }
            if !grew {
                break;
            }
        }
        let mut addrs: Vec<IpAddr> = Vec::new();
        for (owner, rdata) in &records {
            if !names.contains(owner) {
                continue;
            }
            let a = match rdata {
                RData::A(a) => IpAddr::V4(Ipv4Addr::from(a.address)),
                RData::AAAA(a) => IpAddr::V6(Ipv6Addr::from(a.address)),
                _ => continue,
            };
            if !addrs.contains(&a) {
                addrs.push(a);
            }
        }
        if !addrs.is_empty() {
            out.push((asked, addrs));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use simple_dns::{CLASS, Name, Question, ResourceRecord, TYPE, rdata};

    use super::*;

    fn response(q: &str, records: Vec<ResourceRecord<'_>>) -> Vec<u8> {
        let mut p = Packet::new_reply(7);
        p.questions.push(Question::new(
            Name::new_unchecked(q),
            TYPE::A.into(),
            CLASS::IN.into(),
            false,
        ));
        p.answers = records;
        p.build_bytes_vec_compressed().expect("builds")
    }

    fn rr<'a>(name: &'a str, data: RData<'a>) -> ResourceRecord<'a> {
        ResourceRecord::new(Name::new_unchecked(name), CLASS::IN, 60, data)
    }

    #[test]
    fn follows_cname_chains_to_the_addresses_of_the_name_asked() {
        let msg = response(
            "Files.Example.com",
            vec![
                rr(
                    "files.example.com",
                    RData::CNAME(rdata::CNAME(Name::new_unchecked("edge.cdn.test"))),
                ),
                rr(
                    "edge.cdn.test",
                    RData::A(rdata::A {
                        address: 0xc000_0207,
                    }),
                ),
                rr(
                    "edge.cdn.test",
                    RData::AAAA(rdata::AAAA {
                        address: 0x2001_0db8_0000_0000_0000_0000_0000_0001,
                    }),
                ),
                // An address for a name the chain does not reach is not the asked name's.
                rr(
                    "other.test",
                    RData::A(rdata::A {
                        address: 0x0a00_0001,
                    }),
                ),
            ],
        );
        let got = answers(&msg).expect("parses");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, "files.example.com");
        assert_eq!(
            got[0].1,
            vec![
                "192.0.2.7".parse::<IpAddr>().expect("ip"),
                "2001:db8::1".parse::<IpAddr>().expect("ip")
            ]
        );
    }

    #[test]
    fn queries_and_garbage_are_errors() {
        let mut q = Packet::new_query(1);
        q.questions.push(Question::new(
            Name::new_unchecked("a.test"),
            TYPE::A.into(),
            CLASS::IN.into(),
            false,
        ));
        let bytes = q.build_bytes_vec().expect("builds");
        assert_eq!(answers(&bytes), Err(DnsError::NotResponse));
        assert!(matches!(answers(b"\x00\x01"), Err(DnsError::Malformed(_))));
        // Every prefix of a valid response is an error or a (partial) result, never a panic.
        let msg = response(
            "a.test",
            vec![rr("a.test", RData::A(rdata::A { address: 1 }))],
        );
        for n in 0..msg.len() {
            let _ = answers(&msg[..n]);
        }
        // A CNAME loop ends.
        let looped = response(
            "a.test",
            vec![
                rr(
                    "a.test",
                    RData::CNAME(rdata::CNAME(Name::new_unchecked("b.test"))),
                ),
                rr(
                    "b.test",
                    RData::CNAME(rdata::CNAME(Name::new_unchecked("a.test"))),
                ),
                rr("b.test", RData::A(rdata::A { address: 2 })),
            ],
        );
        assert_eq!(
            answers(&looped).expect("parses")[0].1,
            vec![IpAddr::V4(Ipv4Addr::from(2))]
        );
    }
}
