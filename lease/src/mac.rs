//! Ethernet MAC addresses as they appear in lease JSON (`"0e:5a:12:34:56:78"`).

use std::fmt;
use std::str::FromStr;

/// A 48-bit MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// Whether this is a unicast address that is not all zeros, i.e. one a
    /// VTEP may use.
    pub fn is_unicast(&self) -> bool {
        self.0[0] & 1 == 0 && self.0 != [0; 6]
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let p = parts
                .next()
                .ok_or_else(|| format!("{s:?} is not a MAC address"))?;
            if p.len() != 2 {
                return Err(format!("{s:?} is not a MAC address"));
            }
            *byte = u8::from_str_radix(p, 16).map_err(|_| format!("{s:?} is not a MAC address"))?;
        }
        if parts.next().is_some() {
            return Err(format!("{s:?} is not a MAC address"));
        }
        Ok(MacAddr(out))
    }
}

serde_as_text!(MacAddr);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_print() {
        let mac: MacAddr = "0e:5A:12:34:56:78".parse().unwrap();
        assert_eq!(mac.to_string(), "0e:5a:12:34:56:78");
        assert!(mac.is_unicast());
        assert!(!"01:00:5e:00:00:01".parse::<MacAddr>().unwrap().is_unicast());
        assert!(!"00:00:00:00:00:00".parse::<MacAddr>().unwrap().is_unicast());
        for bad in [
            "",
            "0e:5a:12:34:56",
            "0e:5a:12:34:56:78:9a",
            "0e-5a-12-34-56-78",
            "zz:5a:12:34:56:78",
            "e:5a:12:34:56:78",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
    }
}
