"""gRPC plumbing that servers and clients share: message-size limits and TLS credentials.

In the library (not in services/) because clients need it as much as servers: the router dials the model services,
`minedraft generate` dials the router, and both must agree with the servers on limits and on how a PEM file is read.
Credentials are optional everywhere: plaintext is the default, which suits one host listening on 127.0.0.1.
"""

from __future__ import annotations

import grpc


def channel_options(max_message_mb: int) -> list[tuple[str, int]]:
    n = max_message_mb * 1024 * 1024
    return [("grpc.max_send_message_length", n), ("grpc.max_receive_message_length", n)]


def read_pem(path: str, what: str) -> bytes:
    try:
        data = open(path, "rb").read()
    except OSError as exc:
        raise SystemExit(f"cannot read {what} {path!r}: {exc}") from None
    if b"-----BEGIN" not in data:
        raise SystemExit(f"{what} {path!r} is not a PEM file")
    return data


def server_credentials(cert: str, key: str, client_ca: str = "") -> grpc.ServerCredentials | None:
    """None (plaintext) unless a certificate is configured; with `client_ca`, clients must present a certificate
    signed by it (mutual TLS)."""
    if not cert and not key:
        if client_ca:
            raise SystemExit("--client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
        return None
    if not (cert and key):
        raise SystemExit("--tls-cert and --tls-key go together")
    pair = (read_pem(key, "TLS key"), read_pem(cert, "TLS certificate"))
    if client_ca:
        return grpc.ssl_server_credentials([pair], root_certificates=read_pem(client_ca, "client CA"),
                                           require_client_auth=True)
    return grpc.ssl_server_credentials([pair])


def channel_credentials(ca: str = "", cert: str = "", key: str = "") -> grpc.ChannelCredentials:
    """TLS for a client: verify the server with `ca` (system roots when empty); present `cert`/`key` for mTLS."""
    if bool(cert) != bool(key):
        raise SystemExit("a client certificate and its key go together")
    return grpc.ssl_channel_credentials(root_certificates=read_pem(ca, "CA") if ca else None,
                                        private_key=read_pem(key, "client key") if key else None,
                                        certificate_chain=read_pem(cert, "client certificate") if cert else None)
