"""``ragllm serve``: start the HTTP server."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ragllm.config import PROFILES, load_settings


def add_parser(commands: Any) -> None:
    parser = commands.add_parser("serve", help="run the OpenAI-compatible server")
    parser.add_argument("--host", help="bind address (default 127.0.0.1; cloud profile 0.0.0.0)")
    parser.add_argument("--port", type=int, help="port (default 8081)")
    parser.add_argument("--profile", choices=PROFILES, help="settings profile (default local)")
    parser.add_argument(
        "--model", help="Hugging Face id, local directory or .gguf file (env LLM_MODEL_ID)"
    )
    parser.add_argument("--served-model-name", help="the name clients send as 'model'")
    parser.add_argument("--engine", help="engine implementation (default transformers)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="where the model runs")
    parser.add_argument("--max-model-len", type=int, help="context window in tokens")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    parser.set_defaults(run=run)


def settings_from_args(args: argparse.Namespace) -> Any:
    engine = {
        "model": args.model,
        "served_model_name": args.served_model_name,
        "name": args.engine,
        "device": args.device,
        "max_model_len": args.max_model_len,
    }
    server = {"host": args.host, "port": args.port, "log_level": args.log_level}
    return load_settings(
        profile=args.profile,
        engine={k: v for k, v in engine.items() if v is not None} or None,
        server={k: v for k, v in server.items() if v is not None} or None,
    )


# After a drain (or its grace period), how long uvicorn waits for connections still open.
CONNECTION_CLOSE_WAIT_S = 2


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from ragllm.app import ConfigurationError, create_app
    from ragllm.cli.abortable_http import AbortableHTTPProtocol
    from ragllm.cli.draining_server import DrainingServer
    from ragllm.telemetry.logging import configure_logging

    try:
        settings = settings_from_args(args)
    except (
        ValueError
    ) as exc:  # pydantic's ValidationError included: say what is wrong, not a traceback
        print(f"ragllm serve: invalid settings: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.server)
    try:
        app = create_app(settings)
    except ConfigurationError as exc:
        print(f"ragllm serve: {exc}", file=sys.stderr)
        return 2
    config = uvicorn.Config(
        app,
        host=settings.server.host,
        port=settings.server.port,
        http=AbortableHTTPProtocol,
        log_level=settings.server.log_level,
        access_log=False,
        timeout_graceful_shutdown=CONNECTION_CLOSE_WAIT_S,
        log_config=None,
    )  # keep the handlers configure_logging installed
    lifecycle = app.state.ragllm.lifecycle
    DrainingServer(config, lifecycle).run()
    return lifecycle.exit_code
