"""`vidu serve`: many live characters from one server, over WebRTC (aiohttp + aiortc).

    options.py    ServeOptions: every limit and default; the bind / token check
    core.py       the model side, a process per device (Core: its model, worker, sessions' engines) and the
                  server's handle on each (CoreHandle): messages over a pipe, so a worker never shares a GIL
                  with the WebRTC side or another GPU's worker
    model.py      ServeModel: one loaded model per worker device, its profiles and their measured chunk times
    profile.py    Profile: what the web side knows of a model's profiles (no torch: the page's process imports it)
    scheduler.py  the Worker thread of a core (earliest deadline first, due sessions' chunks batched into one
                  forward) and its admission
    ring.py       FrameRing: chunks' frames from a core (or a stream) to the web side through shared memory
    single.py     PageSink: `vidu stream --serve`, the stream's session on this server in a process of its own
    sessions.py   ServeSession: a character's session as the server sees it, history, viewer and data channel
    media.py      Timeline and the WebRTC video / audio tracks that play it in sync
    metrics.py    Prometheus text and JSON logs
    app.py        create_app(options, models): the HTTP routes; serve() runs it
    static/       the page (index.html) and its script (app.js)

    from stages.serve.app import create_app
    from stages.serve.model import ServeModel
    from stages.serve.options import ServeOptions
    model = ServeModel(None, "tiny"); model.calibrate(4)          # chunk times measured, per profile
    app = create_app(ServeOptions(max_sessions=4), [model])       # aiohttp.web.Application; the core on a thread
    # vidu serve: create_app(opts, CoreHandle.processes([ModelSpec(...)], opts)): a core process per device

Run it: `vidu serve` (vidu_cli/serve.py), then open http://127.0.0.1:8000/. Load test:
benchmarks/serve_load.py (--max-batch 1 vs N: sessions per GPU without and with batching). A worker runs the
chunks of its due sessions that share steps, size and window position in one forward (stages/stream/batch.py).
"""
