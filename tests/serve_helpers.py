"""Helpers of the `vidu serve` tests: a server on a free loopback port, uploads, a Prometheus text parser."""
from __future__ import annotations

import io
import math
import re
from contextlib import asynccontextmanager

import numpy as np
from aiohttp import FormData, web
from PIL import Image

from stages.serve.app import create_app
from stages.serve.options import ServeOptions


@asynccontextmanager
async def running(opts: ServeOptions, models, apps: list | None = None):
    """The app of `opts` over `models` on 127.0.0.1 at a free port: yields its base URL (the app is
    appended to `apps` when given)."""
    app = create_app(opts, models)
    if apps is not None:
        apps.append(app)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def png(width: int = 80, height: int = 80, seed: int = 0) -> bytes:
    rgb = (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue()


def upload(image: bytes | str | None = None, filename: str = "ref.png", **fields) -> FormData:
    form = FormData(default_to_multipart=True)
    if isinstance(image, str):                      # a text field, e.g. a path
        form.add_field("image", image)
    elif image is not None:
        form.add_field("image", image, filename=filename, content_type="image/png")
    for k, v in fields.items():
        form.add_field(k, str(v))
    return form


SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*",?)*\})? '
                    r'(-?(?:[0-9.eE+-]+|\+Inf|-Inf|NaN))$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\.)*)"')


def parse_prometheus(text: str) -> dict[str, dict]:
    """Prometheus text format 0.0.4 -> {family: {"type", "help", "samples": {(name, labels): value}}};
    ValueError on any line that is not a comment or a sample of a declared family, and on a histogram
    whose buckets are not cumulative or whose +Inf bucket is not its count."""
    families: dict[str, dict] = {}
    for line in text.splitlines():
        if not line:
            continue
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            _, what, name, rest = line.split(" ", 3)
            fam = families.setdefault(name, {"type": None, "help": None, "samples": {}})
            if what == "TYPE":
                if rest not in ("counter", "gauge", "histogram", "summary", "untyped"):
                    raise ValueError(f"bad type: {line}")
                fam["type"] = rest
            else:
                fam["help"] = rest
            continue
        if line.startswith("#"):
            continue
        m = SAMPLE.match(line)
        if not m:
            raise ValueError(f"not a sample line: {line!r}")
        name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        fam_name = next((f for f in (name, re.sub(r"_(bucket|sum|count)$", "", name)) if f in families), None)
        if fam_name is None or families[fam_name]["type"] is None:
            raise ValueError(f"sample of an undeclared family: {line!r}")
        families[fam_name]["samples"][(name, tuple(LABEL.findall(labels)))] = value
    for name, fam in families.items():
        if fam["type"] == "histogram":
            buckets = [(dict(lb)["le"], v) for (n, lb), v in fam["samples"].items() if n == name + "_bucket"]
            values = [v for _, v in sorted(buckets, key=lambda b: math.inf if b[0] == "+Inf" else float(b[0]))]
            if values != sorted(values) or values[-1] != fam["samples"][(name + "_count", ())]:
                raise ValueError(f"histogram {name} is not cumulative")
    return families


def value(families: dict, name: str, **labels) -> float:
    fam = families[re.sub(r"_(bucket|sum|count)$", "", name)] if name not in families else families[name]
    return fam["samples"][(name, tuple(labels.items()))]
