//! Checking the messages a Postgres client sends before pgwire decodes them.
//!
//! pgwire's decoders trust the counts and lengths inside a message (a Bind that
//! claims more parameter bytes than it sends makes them read past the message), so
//! every frontend message is read whole here, within a size limit, and its layout
//! checked against the protocol; one that does not fit is a protocol violation
//! (SQLSTATE `08P01`) and ends the connection with an error, before any decoder
//! sees it. The entry point is [`check_message`].

use std::fmt;

/// `SSLRequest`'s code in the startup phase.
pub const SSL_REQUEST: i32 = 80_877_103;
/// `GSSENCRequest`'s code.
pub const GSS_REQUEST: i32 = 80_877_104;
/// `CancelRequest`'s code.
pub const CANCEL_REQUEST: i32 = 80_877_102;
/// The longest startup-phase message (PostgreSQL's own limit).
pub const MAX_STARTUP_MESSAGE: usize = 10_000;

/// Why a message was refused, and its SQLSTATE.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub sqlstate: &'static str,
    pub message: String,
}

impl Refusal {
    pub fn protocol(message: impl Into<String>) -> Refusal {
        Refusal {
            sqlstate: "08P01",
            message: message.into(),
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.sqlstate)
    }
}

/// Reads the parts of one message body, refusing reads past its end.
struct Body<'a> {
    bytes: &'a [u8],
    what: char,
}

impl<'a> Body<'a> {
    fn short(&self) -> Refusal {
        Refusal::protocol(format!(
            "message '{}' is shorter than its contents claim",
            self.what
        ))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Refusal> {
        if n > self.bytes.len() {
            return Err(self.short());
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, Refusal> {
        Ok(self.take(1)?.first().copied().unwrap_or_default())
    }

    fn u16(&mut self) -> Result<u16, Refusal> {
        let b = self.take(2)?.try_into().map_err(|_| self.short())?;
        Ok(u16::from_be_bytes(b))
    }

    fn i32(&mut self) -> Result<i32, Refusal> {
        let b = self.take(4)?.try_into().map_err(|_| self.short())?;
        Ok(i32::from_be_bytes(b))
    }

    fn cstring(&mut self) -> Result<&'a [u8], Refusal> {
        let end = self.bytes.iter().position(|b| *b == 0).ok_or_else(|| {
            Refusal::protocol(format!(
                "message '{}' has an unterminated string",
                self.what
            ))
        })?;
        let s = self.take(end)?;
        self.take(1)?;
        Ok(s)
    }

    fn end(&self) -> Result<(), Refusal> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(Refusal::protocol(format!(
                "message '{}' has {} bytes after its contents",
                self.what,
                self.bytes.len()
            )))
        }
    }
}

/// What to forward of a message that was checked.
#[derive(Debug, PartialEq, Eq)]
pub enum Checked {
    /// The message as it came.
    AsIs,
    /// The message with its body replaced (an `Execute` with a negative row limit
    /// becomes one without a limit, as PostgreSQL reads it).
    Rewritten(Vec<u8>),
}

/// Checks the body of a message of type `kind` after the startup phase.
pub fn check_message(kind: u8, body: &[u8]) -> Result<Checked, Refusal> {
    let mut b = Body {
        bytes: body,
        what: char::from(kind),
    };
    match kind {
        // Query: one string.
        b'Q' => {
            b.cstring()?;
            b.end()?;
        }
        // Parse: statement name, query, parameter types.
        b'P' => {
            b.cstring()?;
            b.cstring()?;
            let types = b.u16()?;
            b.take(usize::from(types) * 4)?;
            b.end()?;
        }
        // Bind: portal, statement, parameter formats, parameters, result formats.
        b'B' => {
            b.cstring()?;
            b.cstring()?;
            let formats = b.u16()?;
            b.take(usize::from(formats) * 2)?;
            let parameters = b.u16()?;
            for _ in 0..parameters {
                match b.i32()? {
                    -1 => {}
                    n if n < 0 => {
                        return Err(Refusal::protocol(format!(
                            "Bind parameter length {n} is invalid"
                        )));
                    }
                    n => {
                        b.take(usize::try_from(n).map_err(|_| b.short())?)?;
                    }
                }
            }
            let results = b.u16()?;
            b.take(usize::from(results) * 2)?;
            b.end()?;
        }
        // Execute: portal, row limit (0 or less: all rows).
        b'E' => {
            let portal = b.cstring()?;
            let max_rows = b.i32()?;
            b.end()?;
            if max_rows < 0 {
                let mut rewritten = portal.to_vec();
                rewritten.push(0);
                rewritten.extend_from_slice(&0i32.to_be_bytes());
                return Ok(Checked::Rewritten(rewritten));
            }
        }
        // Describe and Close: 'S'tatement or 'P'ortal, and its name.
        b'D' | b'C' => {
            let target = b.u8()?;
            if target != b'S' && target != b'P' {
                return Err(Refusal::protocol(format!(
                    "message '{}' names neither a statement nor a portal",
                    char::from(kind)
                )));
            }
            b.cstring()?;
            b.end()?;
        }
        // Sync, Flush, Terminate, CopyDone: no body.
        b'S' | b'H' | b'X' | b'c' => b.end()?,
        // CopyData, CopyFail, password and SASL messages: free-form.
        b'd' | b'f' | b'p' => {}
        other => {
            return Err(Refusal::protocol(format!(
                "unsupported frontend message type {:?}",
                char::from(other)
            )));
        }
    }
    Ok(Checked::AsIs)
}

/// An `ErrorResponse` message (severity FATAL) with `refusal`'s SQLSTATE and message.
pub fn error_response(refusal: &Refusal) -> Vec<u8> {
    let mut fields = Vec::new();
    for (code, value) in [
        (b'S', "FATAL"),
        (b'V', "FATAL"),
        (b'C', refusal.sqlstate),
        (b'M', refusal.message.as_str()),
    ] {
        fields.push(code);
        fields.extend(value.bytes().filter(|b| *b != 0));
        fields.push(0);
    }
    fields.push(0);
    let mut message = vec![b'E'];
    let len = i32::try_from(fields.len().saturating_add(4)).unwrap_or(i32::MAX);
    message.extend_from_slice(&len.to_be_bytes());
    message.extend_from_slice(&fields);
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bind(parameters: &[Option<&[u8]>], claimed: Option<i32>) -> Vec<u8> {
        let mut body = b"\0\0".to_vec();
        body.extend_from_slice(&0u16.to_be_bytes());
        body.extend_from_slice(&(parameters.len() as u16).to_be_bytes());
        for p in parameters {
            match p {
                None => body.extend_from_slice(&(-1i32).to_be_bytes()),
                Some(v) => {
                    let len = claimed.unwrap_or(v.len() as i32);
                    body.extend_from_slice(&len.to_be_bytes());
                    body.extend_from_slice(v);
                }
            }
        }
        body.extend_from_slice(&0u16.to_be_bytes());
        body
    }

    #[test]
    fn well_formed_messages_pass() {
        assert_eq!(check_message(b'Q', b"SELECT 1\0"), Ok(Checked::AsIs));
        let mut parse = b"\0SELECT $1\0".to_vec();
        parse.extend_from_slice(&1u16.to_be_bytes());
        parse.extend_from_slice(&23u32.to_be_bytes());
        assert_eq!(check_message(b'P', &parse), Ok(Checked::AsIs));
        assert_eq!(
            check_message(b'B', &bind(&[Some(b"42"), None], None)),
            Ok(Checked::AsIs)
        );
        assert_eq!(check_message(b'S', b""), Ok(Checked::AsIs));
        assert_eq!(check_message(b'D', b"S\0"), Ok(Checked::AsIs));
    }

    #[test]
    fn lying_and_garbled_messages_are_refused() {
        // A Parse claiming more parameter types than it sends.
        let mut parse = b"\0SELECT $1\0".to_vec();
        parse.extend_from_slice(&500u16.to_be_bytes());
        assert!(check_message(b'P', &parse).is_err());
        // A parameter claiming 1 GB.
        assert!(check_message(b'B', &bind(&[Some(b"x")], Some(1 << 30))).is_err());
        assert!(check_message(b'B', &bind(&[Some(b"x")], Some(-7))).is_err());
        // Garbage.
        assert!(check_message(b'P', b"\xff\xfe").is_err());
        assert!(check_message(b'Q', b"SELECT 1").is_err());
        assert!(check_message(b'D', b"Z\0").is_err());
        assert!(check_message(b'S', b"x").is_err());
        assert!(check_message(b'F', b"").is_err());
    }

    #[test]
    fn a_negative_row_limit_means_all_rows() {
        let mut execute = b"\0".to_vec();
        execute.extend_from_slice(&(-5i32).to_be_bytes());
        let mut unlimited = b"\0".to_vec();
        unlimited.extend_from_slice(&0i32.to_be_bytes());
        assert_eq!(
            check_message(b'E', &execute),
            Ok(Checked::Rewritten(unlimited))
        );
    }

    proptest::proptest! {
        /// Whatever a client sends after the startup, the check answers (passes,
        /// rewrites or refuses it) and never panics; a refusal is a protocol error.
        #[test]
        fn any_bytes_are_checked_without_panicking(
            kind in proptest::sample::select(b"QPBEDCSHXcdfpFZ\0\xff".to_vec()),
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
        ) {
            if let Err(refusal) = check_message(kind, &body) {
                proptest::prop_assert_eq!(refusal.sqlstate, "08P01");
            }
        }

        /// Bind messages as a client builds them pass, whatever their parameters.
        #[test]
        fn well_formed_binds_pass(
            parameters in proptest::collection::vec(
                proptest::option::of(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40)),
                0..20,
            ),
        ) {
            let parameters: Vec<Option<&[u8]>> = parameters.iter().map(|p| p.as_deref()).collect();
            proptest::prop_assert_eq!(check_message(b'B', &bind(&parameters, None)), Ok(Checked::AsIs));
        }
    }

    #[test]
    fn error_responses_are_framed() {
        let e = error_response(&Refusal::protocol("bad"));
        assert_eq!(e[0], b'E');
        let len = i32::from_be_bytes([e[1], e[2], e[3], e[4]]) as usize;
        assert_eq!(len + 1, e.len());
        assert!(e.ends_with(b"Mbad\0\0"));
    }
}
