"""`sdtrt serve`: an HTTP server for sdtrt's pipelines.

    config.py   what a server is started with (models, queue, batching, limits)
    worker.py   one thread per model owning its Pipeline: bounded queue, dynamic batching, cancellation
    server.py   the state behind the routes: request -> checked job -> result
    app.py      the ASGI app: middleware (request id, body limit, API key), errors, health, metrics
    native.py   /v1/txt2img ...    openai.py  /v1/images/generations    a1111.py  /sdapi/v1/...
    schemas.py  the native bodies, images in and out    metrics.py  Prometheus    preview.py  latent previews
    playground.py  the page at / (static/: HTML, CSS, JS) and GET /v1/models, what it reads
    launch.py   uvicorn or Ray Serve from the command line    ray_app.py  the Ray Serve deployment

Needs the `serve` extra: pip install 'sdtrt[serve]'.
"""
