"""``python -m service``: run the gRPC server (see ``--help`` for every setting)."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from service.server.config_loading import (
        ConfigError,
        build_parser,
        load_settings,
        parse_flag_values,
    )

    args = build_parser().parse_args(argv)
    config = args.config or (
        Path(os.environ["CLASSIFIER_CONFIG"]) if os.environ.get("CLASSIFIER_CONFIG") else None
    )
    try:
        settings = load_settings(config, **parse_flag_values(args))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(settings.model_dump_json(indent=2))
        return 0

    from service.server import logs

    logs.configure(settings.log_level, settings.log_format)
    try:
        if settings.worker_count() > 1:
            # Files every worker would fail on stop the server here, once, with a message
            # (rather than crash-looping the workers).
            if settings.tls_cert is not None and settings.tls_key is not None:
                from service.server.tls import check_server_files

                try:
                    check_server_files(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
                except ValueError as exc:
                    raise OSError(str(exc)) from None
            # Before anything of gRPC or Prometheus exists in this process: it forks.
            from service.server.workers import supervise

            return supervise(settings)
        from service.server import eventloop
        from service.server.main import serve

        eventloop.run(serve(settings))
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
