//! The raw single-stream baseline for `bench/swarm.py`: what one plain TCP
//! stream can do on this machine, natively, with no protocol, no hashing and
//! no scheduling. The sender `sendfile`s the file; the receiver reads 1 MiB at
//! a time, writes to a file and fsyncs at the end, timing from accept.
//!
//!     raw_tcp recv OUT          prints its port, then "BYTES SECONDS"
//!     raw_tcp send FILE PORT

use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::time::Instant;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let result = match args.get(1).map(String::as_str) {
        Some("recv") if args.len() == 3 => receive(&args[2]),
        Some("send") if args.len() == 4 => send(&args[2], &args[3]),
        _ => Err("usage: raw_tcp recv OUT | raw_tcp send FILE PORT".into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("raw_tcp: {e}");
            ExitCode::FAILURE
        }
    }
}

fn receive(out: &str) -> Result<(), String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    println!("{port}");
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    let (mut stream, _) = listener.accept().map_err(|e| e.to_string())?;
    let start = Instant::now();
    let mut file = File::create(out).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = stream.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        file.write_all(&buf[..n]).map_err(|e| e.to_string())?;
        total += n as u64;
    }
    file.sync_all().map_err(|e| e.to_string())?;
    println!("{total} {}", start.elapsed().as_secs_f64());
    Ok(())
}

fn send(path: &str, port: &str) -> Result<(), String> {
    let file = File::open(path).map_err(|e| e.to_string())?;
    let len = file.metadata().map_err(|e| e.to_string())?.len();
    let stream = TcpStream::connect(("127.0.0.1", port.parse::<u16>().map_err(|e| e.to_string())?))
        .map_err(|e| e.to_string())?;
    let mut offset: libc::off_t = 0;
    while (offset as u64) < len {
        let left = (len - offset as u64).min(1 << 30) as usize;
        // SAFETY: both descriptors are open; `offset` is a valid pointer.
        let n = unsafe { libc::sendfile(stream.as_raw_fd(), file.as_raw_fd(), &mut offset, left) };
        if n <= 0 {
            return Err(format!("sendfile: {}", std::io::Error::last_os_error()));
        }
    }
    Ok(())
}
