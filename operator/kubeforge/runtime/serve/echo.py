"""A trivial OpenAI-compatible engine stand-in: no model, answers at once (or after --delay per token).

It speaks the same prefill/decode protocol shape as the reference engine (a prefill leg returns
kv_transfer_params naming itself; a decode leg accepts them), so router overhead can be measured in
isolation and router failure paths tested without loading a model.

    python -m kubeforge.runtime.serve.echo --port 8100 [--delay 0.0] [--name echo]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from . import metrics as m


def build_app(name: str = "echo", delay: float = 0.0, port: int = 0, host: str = "127.0.0.1") -> Starlette:
    reg = m.Registry()
    state = {"running": 0}
    last: dict[str, dict] = {}  # leg -> the last request's body and headers (GET /debug/last)
    reg.gauge(m.VLLM_WAITING, "Requests waiting.", ["model_name"], fn=lambda: {(("model_name", name),): 0})
    reg.gauge(
        m.VLLM_RUNNING,
        "Requests running.",
        ["model_name"],
        fn=lambda: {(("model_name", name),): state["running"]},
    )
    seen = reg.counter("kubeforge:echo_requests_total", "Requests by leg.", ["leg"])

    async def generate(request: Request) -> Response:
        body = await request.json()
        kvp = body.get("kv_transfer_params") or {}
        leg = (
            "prefill"
            if kvp.get("do_remote_decode")
            else ("decode" if kvp.get("do_remote_prefill") else "plain")
        )
        seen.inc(leg=leg)
        last[leg] = {"body": body, "headers": dict(request.headers)}
        n = 1 if leg == "prefill" else int(body.get("max_tokens") or 16)
        chat = request.url.path.endswith("/chat/completions")
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex
        state["running"] += 1
        if not body.get("stream") or leg == "prefill":
            try:
                if delay:
                    await asyncio.sleep(delay * n)
            finally:
                state["running"] -= 1
            text = "x" * n
            choice = (
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
                if chat
                else {"index": 0, "text": text, "finish_reason": "length"}
            )
            out = {
                "id": rid,
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()),
                "model": name,
                "choices": [choice],
                "usage": {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1},
            }
            if leg == "decode":
                out["received_kv_transfer_params"] = kvp  # lets tests see what the router forwarded
            if leg == "prefill":
                out["kv_transfer_params"] = {
                    "do_remote_prefill": True,
                    "do_remote_decode": False,
                    "remote_engine_id": name,
                    "remote_block_ids": [rid],
                    "remote_host": host,
                    "remote_port": port,
                }
            return JSONResponse(out)

        async def sse():
            try:
                for _ in range(n):
                    if delay:
                        await asyncio.sleep(delay)
                    d = (
                        {"choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}]}
                        if chat
                        else {"choices": [{"index": 0, "text": "x", "finish_reason": None}]}
                    )
                    d.update(id=rid, model=name, created=int(time.time()))
                    yield b"data: " + json.dumps(d).encode() + b"\n\n"
                yield b"data: [DONE]\n\n"
            finally:
                state["running"] -= 1

        return StreamingResponse(sse(), media_type="text/event-stream")

    async def debug_last(request: Request) -> Response:
        return JSONResponse(last)

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": name, "object": "model"}]})

    async def health(request: Request) -> Response:
        return Response(status_code=200)

    async def metrics(request: Request) -> Response:
        return Response(reg.render(), media_type=m.CONTENT_TYPE)

    return Starlette(
        routes=[
            Route("/v1/completions", generate, methods=["POST"]),
            Route("/v1/chat/completions", generate, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/debug/last", debug_last, methods=["GET"]),
        ]
    )


def main(argv=None) -> None:
    import uvicorn

    p = argparse.ArgumentParser(prog="python -m kubeforge.runtime.serve.echo")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--delay", type=float, default=0.0, help="seconds per generated token")
    p.add_argument("--name", default="echo")
    a = p.parse_args(argv)
    uvicorn.run(
        build_app(a.name, a.delay, a.port, a.host),
        host=a.host,
        port=a.port,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
