//! A plain TCP proxy on 127.0.0.1 that can be cut and restored: stands in for "the broker is
//! unreachable" while the broker itself (memory storage) keeps its data.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

pub struct Proxy {
    pub port: u16,
    backend: u16,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    acceptor: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Listens on a free port, forwarding to `127.0.0.1:backend`.
    pub fn start(backend: u16) -> Proxy {
        Proxy::start_on(super::free_port(), backend)
    }

    /// Listens on `port`, forwarding to `127.0.0.1:backend`.
    pub fn start_on(port: u16, backend: u16) -> Proxy {
        let mut p = Proxy {
            port,
            backend,
            stop: Arc::new(AtomicBool::new(false)),
            conns: Arc::new(Mutex::new(Vec::new())),
            acceptor: None,
        };
        p.resume();
        p
    }

    /// Closes the listener and every open connection: clients see resets and refusals.
    pub fn cut(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    /// Listens again on the same port.
    pub fn resume(&mut self) {
        self.stop = Arc::new(AtomicBool::new(false));
        let listener = TcpListener::bind(("127.0.0.1", self.port)).expect("bind proxy port");
        listener.set_nonblocking(true).unwrap();
        let (stop, conns, backend) = (self.stop.clone(), self.conns.clone(), self.backend);
        self.acceptor = Some(std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let _ = client.set_nonblocking(false);
                        let Ok(server) = TcpStream::connect(("127.0.0.1", backend)) else {
                            continue;
                        };
                        let mut list = conns.lock().unwrap();
                        for s in [&client, &server] {
                            if let Ok(c) = s.try_clone() {
                                list.push(c);
                            }
                        }
                        pump(client.try_clone().unwrap(), server.try_clone().unwrap());
                        pump(server, client);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        }));
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
    }
}
