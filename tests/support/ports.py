"""A free local TCP port for a multi-process JAX coordinator or a web server."""
import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]
