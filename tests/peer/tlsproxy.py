#!/usr/bin/env python3
"""TLS-terminating proxy for sitewatch's Kafka TLS tests (Python's ssl, i.e. OpenSSL).

    tlsproxy.py CERT KEY CA

Listens on a free 127.0.0.1 port and prints "port N". Then reads the backend port (the
plaintext broker) as one line on stdin. Every client must present a certificate signed by CA
(CERT_REQUIRED); for each accepted client it prints "client <subject CN>", for each refused
handshake "refused <reason>", then forwards bytes both ways to 127.0.0.1:<backend>.
Stops when stdin closes or it is killed.
"""
import socket
import ssl
import sys
import threading

lock = threading.Lock()


def say(line):
    with lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def pipe(src, dst):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def serve(conn, ctx, backend):
    try:
        tls = ctx.wrap_socket(conn, server_side=True)
    except (ssl.SSLError, OSError) as e:
        say(f"refused {e}")
        conn.close()
        return
    cert = tls.getpeercert() or {}
    cn = [v for rdn in cert.get("subject", ()) for (k, v) in rdn if k == "commonName"]
    say(f"client {cn[0] if cn else '?'}")
    try:
        up = socket.create_connection(("127.0.0.1", backend), timeout=10)
        up.settimeout(None)
    except OSError as e:
        say(f"backend {e}")
        tls.close()
        return
    threading.Thread(target=pipe, args=(up, tls), daemon=True).start()
    pipe(tls, up)


def main():
    cert, key, ca = sys.argv[1:4]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(64)
    say(f"port {lsock.getsockname()[1]}")
    backend = int(sys.stdin.readline().strip())

    def accept():
        while True:
            conn, _ = lsock.accept()
            threading.Thread(target=serve, args=(conn, ctx, backend), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    sys.stdin.read()  # until the test closes stdin or kills us


if __name__ == "__main__":
    main()
