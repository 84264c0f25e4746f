"""TLS for the server (optionally mutual) and for upstreams, with certificate rotation.

Rotation without restart: every certificate, key and CA file is watched (security/files.py).

- Server: grpc's dynamic credentials ask ``ServerCertificates.fetch`` at every TLS handshake;
  it answers with the new files once they changed and load as a matching pair. Connections
  already open keep the certificate they were made with.
- HTTP upstreams: each request is given the current ``ssl.SSLContext``; a new context opens
  new pooled connections, old ones drain by keep-alive expiry.
- gRPC upstreams: a change builds a new channel; the old one is closed after its calls finish.
"""

from __future__ import annotations

import ssl

import grpc

from aggregator.config import ServerTls, UpstreamTls
from aggregator.security import pem
from aggregator.security.files import Watched


class ServerCertificates:
    """The server's certificate, key and client CA, handed to grpc as they change."""

    def __init__(self, tls: ServerTls) -> None:
        self._tls = tls
        paths = [tls.cert, tls.key, *([tls.client_ca] if tls.client_ca else [])]
        self._files = Watched("server.tls", paths, self._load)
        self._served = self._files.generation

    def __repr__(self) -> str:
        mutual = "mutual, " if self._tls.client_ca else ""
        return f"<ServerCertificates [{mutual}{self._files!r}]>"

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._files.current(),
            self.fetch,  # type: ignore[arg-type]  # grpc accepts None: "keep the last"
            require_client_authentication=bool(self._tls.client_ca),
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """grpc's question at each handshake: a new configuration, or None to keep the last."""
        configuration = self._files.current()
        if self._files.generation == self._served:
            return None
        self._served = self._files.generation
        return configuration

    def _load(self) -> grpc.ServerCertificateConfiguration:
        tls = self._tls
        pem.check_key_pair(tls.cert, tls.key)  # half-rotated files raise, keeping the last
        if tls.client_ca:
            pem.certificates(tls.client_ca)
        return grpc.ssl_server_certificate_configuration(
            [(pem.read_file(tls.key), pem.read_file(tls.cert))],
            root_certificates=pem.read_file(tls.client_ca) if tls.client_ca else None,
        )


def upstream_files(tls: UpstreamTls) -> list[str]:
    return [path for path in (tls.ca, tls.cert, tls.key) if path]


def ssl_context(tls: UpstreamTls) -> ssl.SSLContext:
    """A client context verifying the upstream (against ``ca`` or the system's CAs)."""
    context = ssl.create_default_context(cafile=tls.ca or None)
    if tls.cert:
        pem.check_key_pair(tls.cert, tls.key)
        context.load_cert_chain(tls.cert, tls.key)
    return context


def channel_credentials(tls: UpstreamTls) -> grpc.ChannelCredentials:
    if tls.cert:
        pem.check_key_pair(tls.cert, tls.key)
    return grpc.ssl_channel_credentials(
        root_certificates=pem.read_file(tls.ca) if tls.ca else None,
        private_key=pem.read_file(tls.key) if tls.key else None,
        certificate_chain=pem.read_file(tls.cert) if tls.cert else None,
    )
