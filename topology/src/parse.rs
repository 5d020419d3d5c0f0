//! Parsers for the small text formats of sysfs; each returns `None` on garbage.

/// Parses a kernel CPU list such as `0-3,8,10-11` (at most `MAX_CPUS` entries, so a corrupt
/// range cannot make us allocate without bound).
pub(crate) fn cpu_list(text: &str) -> Option<Vec<u32>> {
    const MAX_CPUS: usize = 1 << 16;
    let text = text.trim();
    let mut cpus = Vec::new();
    if text.is_empty() {
        return Some(cpus);
    }
    for part in text.split(',') {
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (a.trim().parse::<u32>().ok()?, b.trim().parse::<u32>().ok()?),
            None => {
                let v = part.trim().parse::<u32>().ok()?;
                (v, v)
            }
        };
        if hi < lo
            || (hi - lo) as usize >= MAX_CPUS
            || cpus.len() + ((hi - lo) as usize) >= MAX_CPUS
        {
            return None;
        }
        cpus.extend(lo..=hi);
    }
    cpus.sort_unstable();
    cpus.dedup();
    Some(cpus)
}

/// Parses an RDMA port `rate` such as `400 Gb/sec (4X NDR)` or `2.5 Gb/sec (1X SDR)` into Gbit/s.
pub(crate) fn rate_gbps(text: &str) -> Option<f64> {
    let mut words = text.split_whitespace();
    let value: f64 = words.next()?.parse().ok()?;
    let unit = words.next()?;
    let scale = match unit {
        "Gb/sec" => 1.0,
        "Mb/sec" => 1e-3,
        _ => return None,
    };
    (value.is_finite() && value >= 0.0).then_some(value * scale)
}

/// Parses a hex id such as `0x10de`.
pub(crate) fn hex_u32(text: &str) -> Option<u32> {
    let t = text.trim();
    u32::from_str_radix(t.strip_prefix("0x").unwrap_or(t), 16).ok()
}

/// True for a PCI address `dddd:bb:dd.f` (hex digits).
pub(crate) fn is_pci_address(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() == 12
        && b[4] == b':'
        && b[7] == b':'
        && b[10] == b'.'
        && b.iter()
            .enumerate()
            .all(|(i, c)| matches!(i, 4 | 7 | 10) || c.is_ascii_hexdigit())
}

/// An RDMA port `state` such as `4: ACTIVE` without its number.
pub(crate) fn port_state(text: &str) -> String {
    let t = text.trim();
    t.split_once(':').map_or(t, |(_, s)| s.trim()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(cpu_list("0-3,8,10-11\n"), Some(vec![0, 1, 2, 3, 8, 10, 11]));
        assert_eq!(cpu_list(""), Some(vec![]));
        assert_eq!(cpu_list("3-1"), None);
        assert_eq!(cpu_list("0-4294967295"), None);
        assert_eq!(cpu_list("x"), None);
    }

    #[test]
    fn rates() {
        assert_eq!(rate_gbps("400 Gb/sec (4X NDR)\n"), Some(400.0));
        assert_eq!(rate_gbps("2.5 Gb/sec (1X SDR)"), Some(2.5));
        assert_eq!(rate_gbps("fast"), None);
        assert_eq!(rate_gbps("NaN Gb/sec"), None);
    }

    #[test]
    fn pci_addresses() {
        assert!(is_pci_address("0000:1b:00.0"));
        assert!(!is_pci_address("pci0000:1a"));
        assert!(!is_pci_address("virtio2"));
        assert_eq!(port_state("4: ACTIVE\n"), "ACTIVE");
        assert_eq!(hex_u32("0x10de\n"), Some(0x10de));
    }
}
