"""Every limit and default of `vidu serve`, in one place (ServeOptions), and the bind check."""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

from stages.run import ranged

TOKEN_ENV = "VIDU_SERVE_TOKEN"
TURN_CREDENTIAL_ENV = "VIDU_TURN_CREDENTIAL"


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
    calib_chunks: int = ranged(4, min=1, max=100)   # steady chunks timed per profile and batch size at start
    calib_budget_s: float = ranged(300.0, gt=0, max=3600)   # s the calibration may take: batch sizes beyond 1 and
                                         # max_batch are timed while it lasts, the rest count at the next larger one's
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
    trace: bool = False                  # a JSON log line per worker forward ("round"), per session made ("session_made") and per reference built while idle ("warmed")
    ice_servers: tuple[str, ...] = ()    # STUN / TURN URLs for viewers behind NAT (none: host candidates only)
    turn_username: str | None = None     # for the turn: / turns: URL
    turn_credential: str | None = None

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise ServeError(f"the port must be 0-65535, not {self.port}")
        if not 1 <= self.max_batch <= 256:
            raise ServeError(f"--max-batch must be 1-256, not {self.max_batch}")
        if self.max_sessions < 1:
            raise ServeError(f"--max-sessions must be >= 1, not {self.max_sessions}")
        if not 0 < self.speed <= 100:
            raise ServeError(f"--speed must be in (0, 100], not {self.speed:g}")
        if not 1 <= self.calib_chunks <= 100:
            raise ServeError(f"--calib-chunks must be 1-100, not {self.calib_chunks}")
        if not 0 < self.calib_budget_s <= 3600:
            raise ServeError(f"--calib-budget must be in (0, 3600] s, not {self.calib_budget_s:g}")
        if not 0 < self.headroom <= 1:
            raise ServeError(f"headroom must be in (0, 1], not {self.headroom:g}")
        if self.token is not None and len(self.token) < 8:
            raise ServeError("the token must have at least 8 characters")
        self.ice()

    def ice(self) -> list[dict]:
        """The ICE servers as RTCIceServer fields ({"urls", "username", "credential"}), for the server's peer
        connections and the page's; ServeError (one line) for a URL that is not stun:HOST[:PORT],
        turn:HOST[:PORT][?transport=udp|tcp] or turns:HOST[:PORT]?transport=tcp, a TURN server without a
        username and credential, or more than one of each kind (aiortc uses one STUN and one TURN server)."""
        if not self.ice_servers:
            return []
        from aiortc.rtcicetransport import parse_stun_turn_uri
        out, kinds = [], set()
        for url in self.ice_servers:
            try:
                parsed = parse_stun_turn_uri(url)
            except ValueError as e:
                raise ServeError(f"not a STUN or TURN URL: {url!r} ({e})") from None
            kind = "turn" if parsed["scheme"].startswith("turn") else "stun"
            if parsed["scheme"] == "stuns" or (parsed["scheme"] == "turns" and parsed["transport"] != "tcp"):
                raise ServeError(f"{url!r}: aiortc speaks stun:, turn: and turns: over tcp")
            if kind in kinds:
                raise ServeError(f"more than one {kind.upper()} server: aiortc uses one of each")
            kinds.add(kind)
            server = {"urls": url}
            if kind == "turn":
                if not self.turn_username or not self.turn_credential:
                    raise ServeError(f"the TURN server {url} needs --turn-username and a credential "
                                     f"(--turn-credential or ${TURN_CREDENTIAL_ENV})")
                server.update(username=self.turn_username, credential=self.turn_credential)
            out.append(server)
        return out

    @classmethod
    def from_env(cls, token: str | None = None, turn_credential: str | None = None, **kw) -> "ServeOptions":
        """Options with the token from `token`, else $VIDU_SERVE_TOKEN, and the TURN credential from
        `turn_credential`, else $VIDU_TURN_CREDENTIAL (empty: none)."""
        return cls(token=token or os.environ.get(TOKEN_ENV) or None,
                   turn_credential=turn_credential or os.environ.get(TURN_CREDENTIAL_ENV) or None, **kw)


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
