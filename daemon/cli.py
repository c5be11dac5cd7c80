"""`peaknet-daemon --config FILE`: run until SIGTERM/SIGINT; `--check` validates and prints the
resolved config; `--version`. Exit codes: 0 clean stop, 1 runtime failure, 2 bad config or no
usable device."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from . import __version__
from .config import Config, ConfigError, config_from_dict, dump_yaml, load_config


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="peaknet-daemon", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="YAML config file (default: the built-in CPU demo settings)")
    p.add_argument("--check", action="store_true", help="validate the config, print the resolved one, exit")
    p.add_argument("--version", action="version", version=f"peaknet-daemon {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg: Config = load_config(args.config) if args.config else config_from_dict({}, "<built-in defaults>")
    except ConfigError as exc:
        print(f"peaknet-daemon: config error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(f"# {cfg.source}: valid\n" + dump_yaml(cfg), end="")
        return 0
    return run(cfg)


def ray_environment() -> None:
    """Ray settings that must be in the environment before `import ray`: no log dedup (it would
    fold different rejection details into one "[repeated Nx]" line). A value you set wins."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def run(cfg: Config) -> int:
    ray_environment()
    from .log import configure_logging, get_logger
    from .supervisor import StartupError, Supervisor

    configure_logging(cfg.logging)
    log = get_logger("peaknet.cli")
    stop = threading.Event()

    def _on_signal(signum, _frame):
        log.info("signal", signal=signal.Signals(signum).name)
        stop.set()

    supervisor = Supervisor(cfg)
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _on_signal)
        supervisor.start()
        for sig in (signal.SIGTERM, signal.SIGINT):  # ray.init may have installed its own
            signal.signal(sig, _on_signal)
        supervisor.run(stop)
    except StartupError as exc:
        log.error("startup_failed", error=str(exc))
        print(f"peaknet-daemon: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        log.exception("daemon_failed", error=str(exc))
        supervisor_shutdown(supervisor, log)
        return 1
    supervisor_shutdown(supervisor, log)
    return 0


def supervisor_shutdown(supervisor, log) -> None:
    try:
        supervisor.shutdown()
    except Exception as exc:  # shutting down must never hide the original outcome
        log.exception("shutdown_failed", error=str(exc))


if __name__ == "__main__":
    sys.exit(main())
