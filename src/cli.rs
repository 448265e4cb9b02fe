//! Argument parsing shared by both binaries: addresses that may be host
//! names, and rates and sizes that must carry a unit. Each parser returns the
//! message clap prints after `invalid value ... for '--flag'`, so it says what
//! a right value looks like.

use std::net::{SocketAddr, ToSocketAddrs};

/// Parses `HOST:PORT` or `IP:PORT`, resolving a host name once, now.
///
/// A name may resolve to several addresses (`localhost` to `::1` and
/// `127.0.0.1`); the first IPv4 one is taken, since the programs' defaults
/// listen on IPv4 loopback, else the first of any kind.
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(format!(
            "{s:?} has no port: write HOST:PORT, e.g. {s}:10000 or 127.0.0.1:10000"
        ));
    };
    if host.is_empty() {
        return Err(format!(
            "{s:?} has no host: write HOST:PORT, e.g. 127.0.0.1{s}"
        ));
    }
    if port.parse::<u16>().is_err() {
        return Err(format!(
            "{port:?} is not a port (0-65535): write HOST:PORT, e.g. {host}:10000"
        ));
    }
    let addrs: Vec<SocketAddr> = s
        .to_socket_addrs()
        .map_err(|e| {
            format!("cannot resolve the host name {host:?}: {e} (check the spelling, or give an IP address)")
        })?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("the host name {host:?} resolves to no address"))
}

/// Parses a rate in bytes per second: `20MiB`, `500KB`, `1.5 GB/s`. A bare
/// number is refused: `20` meaning 20 bytes per second is never what was meant.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let size = s.strip_suffix("/s").unwrap_or(s).trim();
    let bytes = parse_size(size)?;
    if bytes == 0 {
        return Err("a rate must be above zero".into());
    }
    Ok(bytes)
}

/// Parses a size with a unit (`64KiB`, `2 MB`; units as `bytesize` reads
/// them); a bare number is refused with a hint.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let hint = "add a unit, e.g. 20MiB or 500KB";
    if s.is_empty() {
        return Err(format!("no value: {hint}"));
    }
    if s.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(format!("{s:?} has no unit: {hint}"));
    }
    let size: bytesize::ByteSize = s
        .parse()
        .map_err(|e| format!("{s:?} is not a size like 20MiB or 500KB: {e}"))?;
    Ok(size.as_u64())
}

/// The network key from `--key`, `--key-file` or the `SHOAL_KEY`
/// environment variable (in that order); `None` for an open network.
pub fn network_key(
    key: Option<&str>,
    key_file: Option<&std::path::Path>,
) -> Result<Option<crate::net::noise::NetworkKey>, String> {
    use crate::net::noise::NetworkKey;
    if let Some(text) = key {
        return NetworkKey::from_text(text)
            .map(Some)
            .map_err(|e| format!("--key: {e}"));
    }
    if let Some(path) = key_file {
        return NetworkKey::read_file(path).map(Some);
    }
    match std::env::var("SHOAL_KEY") {
        Ok(text) if !text.trim().is_empty() => NetworkKey::from_text(&text)
            .map(Some)
            .map_err(|e| format!("SHOAL_KEY: {e}")),
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_addresses_parse_as_they_are() {
        assert_eq!(
            parse_addr("127.0.0.1:10000").unwrap(),
            "127.0.0.1:10000".parse().unwrap()
        );
        assert_eq!(parse_addr("[::1]:7").unwrap(), "[::1]:7".parse().unwrap());
    }

    #[test]
    fn localhost_resolves_to_ipv4_loopback() {
        assert_eq!(
            parse_addr("localhost:10000").unwrap(),
            "127.0.0.1:10000".parse().unwrap()
        );
    }

    #[test]
    fn bad_addresses_say_what_is_wrong() {
        assert!(parse_addr("localhost").unwrap_err().contains("no port"));
        assert!(parse_addr(":80").unwrap_err().contains("no host"));
        assert!(parse_addr("localhost:99999").unwrap_err().contains("port"));
        let e = parse_addr("no-such-host.invalid:10").unwrap_err();
        assert!(e.contains("cannot resolve"), "{e}");
        assert!(e.contains("no-such-host.invalid"), "{e}");
    }

    #[test]
    fn rates_need_a_unit() {
        assert_eq!(parse_rate("20MiB").unwrap(), 20 << 20);
        assert_eq!(parse_rate("500KB").unwrap(), 500_000);
        assert_eq!(parse_rate("1 MB/s").unwrap(), 1_000_000);
        assert_eq!(parse_rate("2B").unwrap(), 2);
        for bare in ["20", "1.5", "0"] {
            let e = parse_rate(bare).unwrap_err();
            assert!(e.contains("add a unit, e.g. 20MiB or 500KB"), "{bare}: {e}");
        }
        assert!(parse_rate("0MiB").is_err());
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("").is_err());
    }
}
