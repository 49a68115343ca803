"""Every limit and default of `vidu serve`, in one place (ServeOptions), and the bind check."""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

from stages.run import ranged

TOKEN_ENV = "VIDU_SERVE_TOKEN"


class ServeError(ValueError):
    """A user-facing problem starting or using the server (message is one line)."""


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = ranged(8000, min=0, max=65535)
    token: str | None = None             # required on every API request when set; required to bind off loopback
    max_sessions: int = ranged(8, min=1, max=10000)   # sessions at once, over all workers
    speed: float = ranged(1.0, gt=0, max=100)  # the fraction of real time every admitted session must keep (1: real time)
    headroom: float = 0.9                # share of a worker's time the admitted sessions' measured chunks may use
    calib_chunks: int = ranged(4, min=1, max=100)   # steady chunks per profile timed at start (after as many warm-up)
    max_batch: int = ranged(8, min=1, max=256)   # sessions' chunks in one forward (1: each chunk its own forward)
    ahead_chunks: int = 3                # chunks a session may generate ahead of its viewer (its output queue; one more riding along in a batch)
    max_upload_bytes: int = 8 << 20      # POST /sessions body
    max_image_side: int = 4096           # px, either side of the reference image
    max_image_pixels: int = 16_000_000
    connect_timeout_s: float = 60.0      # a session without a viewer this long is closed (first connect, reconnect grace)
    idle_timeout_s: float = 600.0        # a session with a viewer but no input (instruction, audio) this long is closed
    requests_per_s: float = 10.0         # per client address (token bucket)
    request_burst: int = 40
    messages_per_s: float = 25.0         # data channel messages per session (push-to-talk sends ~10 a second)
    message_burst: int = 100
    max_message_bytes: int = 64 * 1024   # one data channel message
    max_audio_buffer_s: float = 10.0     # push-to-talk speech waiting for the engine, per session
    commands: bool = True                # spot spoken instructions in push-to-talk speech (stages/stream/commands.py)
    history: int = 200                   # instructions kept per session
    lead_s: float = 0.1                  # s between a session's first chunk and its first frame on the wire

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise ServeError(f"the port must be 0-65535, not {self.port}")
        if not 1 <= self.max_batch <= 256:
            raise ServeError(f"--max-batch must be 1-256, not {self.max_batch}")
        if self.max_sessions < 1:
            raise ServeError(f"--max-sessions must be >= 1, not {self.max_sessions}")
        if not 0 < self.speed <= 100:
            raise ServeError(f"--speed must be in (0, 100], not {self.speed:g}")
        if not 0 < self.headroom <= 1:
            raise ServeError(f"headroom must be in (0, 1], not {self.headroom:g}")
        if self.token is not None and len(self.token) < 8:
            raise ServeError("the token must have at least 8 characters")

    @classmethod
    def from_env(cls, token: str | None = None, **kw) -> "ServeOptions":
        """Options with the token from `token`, else $VIDU_SERVE_TOKEN (empty: none)."""
        return cls(token=token or os.environ.get(TOKEN_ENV) or None, **kw)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(opts: ServeOptions) -> None:
    """ServeError when the server would listen beyond this machine without a token."""
    if not is_loopback(opts.host) and not opts.token:
        raise ServeError(f"binding {opts.host} exposes the server beyond this machine: give --token "
                         f"(or ${TOKEN_ENV}), or bind 127.0.0.1")
