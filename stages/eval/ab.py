"""Blinded A/B preference between two eval runs (the StreamBench verdict): `vidu eval --ab RUN_A RUN_B`.

A local page (aiohttp) shows the two systems' videos of the same sample side by side, which system
is on the left drawn at random per pair and never shown; the voter picks left / right / tie for each
criterion (controllability, motion, sync, overall). Votes go to the catalog's `votes` table already
unblinded (choice a | b | tie, and where A was shown).

Preference rate of A over B per criterion = A wins / (A wins + B wins), ties left out, with a 95 %
Wilson score interval; the tie share is reported next to it.

HTTP API (the page uses it; tests and scripts may too):
    GET  /                      the page
    GET  /api/pair              {"token", "sample", "left", "right", "criteria", "done", "total"}; "token" null when all judged
    GET  /video/{token}/{side}  the mp4 shown on that side (left | right)
    POST /api/vote              {"token", "votes": {criterion: "left" | "right" | "tie"}, "voter"?} -> {"recorded": n}
    GET  /api/results           preference rates and intervals per criterion (unblinded)
"""
from __future__ import annotations

import asyncio
import math
import random
import secrets
import threading
import uuid
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from manifests import catalog

CRITERIA = ("controllability", "motion", "sync", "overall")
CHOICES = ("left", "right", "tie")
Z95 = 1.959963984540054


def wilson(k: int, n: int, z: float = Z95) -> tuple[float | None, float | None]:
    """Wilson score interval of a proportion k / n (None, None when n = 0)."""
    if n == 0:
        return None, None
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def preference(votes: list[dict]) -> dict:
    """{criterion: {a, b, tie, n, rate_a, ci_low, ci_high, tie_share}} from unblinded votes."""
    out = {}
    for c in CRITERIA:
        vs = [v["choice"] for v in votes if v["criterion"] == c]
        a, b, tie = vs.count("a"), vs.count("b"), vs.count("tie")
        lo, hi = wilson(a, a + b)
        out[c] = {"a": a, "b": b, "tie": tie, "n": len(vs), "rate_a": a / (a + b) if a + b else None,
                  "ci_low": lo, "ci_high": hi, "tie_share": tie / len(vs) if vs else None}
    return out


@dataclass
class Pair:
    sample_id: str
    video_a: str
    video_b: str


def pairs(run_a, run_b) -> list[Pair]:
    """Samples both runs scored (status ok) with a video file on disk, in sample order."""
    b = {r["sample_id"]: r for r in run_b.ok if r["video_path"] and Path(r["video_path"]).is_file()}
    return [Pair(r["sample_id"], r["video_path"], b[r["sample_id"]]["video_path"]) for r in run_a.ok
            if r["sample_id"] in b and r["video_path"] and Path(r["video_path"]).is_file()]


class ABSession:
    """The state behind the page: pairs in a random order, each with a random side for A, and the
    votes already cast (a pair with votes on every criterion is not shown again)."""

    def __init__(self, root: Path, run_a, run_b, seed: int | None = None):
        self.root, self.run_a, self.run_b = root, run_a.run_id, run_b.run_id
        if self.run_a == self.run_b:
            raise ValueError("--ab needs two different runs")
        self.pairs = pairs(run_a, run_b)
        if not self.pairs:
            raise ValueError(f"runs {self.run_a} and {self.run_b} have no sample with a video in common")
        rng = random.Random(seed)
        rng.shuffle(self.pairs)
        self.a_left = {p.sample_id: rng.random() < 0.5 for p in self.pairs}
        self.tokens: dict[str, Pair] = {}
        self.lock = threading.Lock()

    def _judged(self) -> set[str]:
        per: dict[str, set[str]] = {}
        for v in catalog.read_votes(self.root, self.run_a, self.run_b):
            per.setdefault(v["sample_id"], set()).add(v["criterion"])
        return {s for s, cs in per.items() if cs >= set(CRITERIA)}

    def next_pair(self) -> dict:
        judged = self._judged()
        todo = [p for p in self.pairs if p.sample_id not in judged]
        base = {"criteria": list(CRITERIA), "choices": list(CHOICES), "done": len(self.pairs) - len(todo),
                "total": len(self.pairs)}
        if not todo:
            return {"token": None, **base}
        p = todo[0]
        token = secrets.token_urlsafe(12)
        with self.lock:
            self.tokens[token] = p
        return {"token": token, "sample": p.sample_id, "left": f"/video/{token}/left",
                "right": f"/video/{token}/right", **base}

    def video(self, token: str, side: str) -> str:
        p = self.tokens.get(token)
        if p is None or side not in ("left", "right"):
            raise KeyError(token)
        a_left = self.a_left[p.sample_id]
        return p.video_a if (side == "left") == a_left else p.video_b

    def vote(self, token: str, votes: dict, voter: str | None = None) -> int:
        p = self.tokens.get(token)
        if p is None:
            raise KeyError(token)
        if not isinstance(votes, dict) or not votes:
            raise ValueError("votes must be an object {criterion: left | right | tie}")
        bad = [c for c in votes if c not in CRITERIA] + [str(v) for v in votes.values() if v not in CHOICES]
        if bad:
            raise ValueError(f"unknown criterion or choice: {', '.join(bad)} (criteria: {', '.join(CRITERIA)}; "
                             f"choices: {', '.join(CHOICES)})")
        a_side = "left" if self.a_left[p.sample_id] else "right"
        rows = [{"vote_id": uuid.uuid4().hex, "run_a": self.run_a, "run_b": self.run_b, "sample_id": p.sample_id,
                 "criterion": c, "choice": "tie" if v == "tie" else ("a" if v == a_side else "b"),
                 "a_side": a_side, "voter": voter} for c, v in votes.items()]
        catalog.record_votes(self.root, rows)
        return len(rows)

    def results(self) -> dict:
        votes = catalog.read_votes(self.root, self.run_a, self.run_b)
        return {"run_a": self.run_a, "run_b": self.run_b, "votes": len(votes), "criteria": preference(votes)}


def make_app(session: ABSession):
    from aiohttp import web

    page = resources.files("stages.eval").joinpath("static/ab.html").read_text(encoding="utf-8")

    async def index(request):
        return web.Response(text=page, content_type="text/html")

    async def pair(request):
        return web.json_response(await asyncio.to_thread(session.next_pair))

    async def video(request):
        try:
            path = session.video(request.match_info["token"], request.match_info["side"])
        except KeyError:
            raise web.HTTPNotFound(text="unknown pair or side") from None
        return web.FileResponse(path, headers={"Content-Type": "video/mp4", "Cache-Control": "no-store"})

    async def vote(request):
        try:
            body = await request.json()
            n = await asyncio.to_thread(session.vote, body.get("token"), body.get("votes"), body.get("voter"))
        except KeyError:
            raise web.HTTPNotFound(text="unknown pair token: ask /api/pair for one") from None
        except (ValueError, AttributeError) as e:
            raise web.HTTPBadRequest(text=str(e) or "the body must be JSON") from None
        return web.json_response({"recorded": n})

    async def results(request):
        return web.json_response(await asyncio.to_thread(session.results))

    app = web.Application()
    app.add_routes([web.get("/", index), web.get("/api/pair", pair), web.get("/video/{token}/{side}", video),
                    web.post("/api/vote", vote), web.get("/api/results", results)])
    return app


class ABServer:
    """The page served from a background thread: `.url`, `.close()` (also a context manager)."""

    def __init__(self, session: ABSession, host: str = "127.0.0.1", port: int = 0):
        from aiohttp import web
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(make_app(session))
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, host, port)
        try:
            self.loop.run_until_complete(site.start())
        except OSError as e:
            self.loop.run_until_complete(self.runner.cleanup())
            raise ValueError(f"cannot serve on {host}:{port}: {e.strerror or e}") from None
        sock = site._server.sockets[0].getsockname()
        self.url = f"http://{host if ':' not in host else f'[{host}]'}:{sock[1]}"
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="vidu-ab")
        self.thread.start()

    def close(self) -> None:
        if self.loop.is_running():
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
