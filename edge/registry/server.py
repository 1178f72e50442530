"""The registry server's composition root: store, ingest, publisher, HTTP, one TaskGroup."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from aiohttp import web

from edge.errors import ConfigError
from edge.registry.desired import DesiredPublisher
from edge.registry.http import Api, make_app
from edge.registry.ingest import Ingest
from edge.registry.settings import RegistrySettings, db_url_for_humans
from edge.registry.store import open_store
from edge.signing import Keyring, load_signer

__all__ = ["run_registry", "serve"]

log = logging.getLogger("edge.registry")


async def serve(settings: RegistrySettings, stop: asyncio.Event) -> None:
    """Run until `stop` is set, then shut down in order: HTTP, ingest, store."""
    signer = None
    if settings.signing_key is not None:
        try:
            signer = await asyncio.to_thread(load_signer, settings.signing_key)
        except ConfigError as exc:
            raise ConfigError(f"--signing-key: {exc}") from exc
        log.info("signing desired documents with key %s", signer.kid)
    store = await open_store(settings.db_url)
    try:
        publisher: DesiredPublisher | None = None

        async def connected() -> None:
            if publisher is not None:
                await publisher.publish_pending()

        def reported(node: str, applied: int, rejected: int | None) -> None:
            if publisher is not None:
                publisher.reported(node, applied, rejected)

        ingest = Ingest(settings, store, on_connected=connected, on_report=reported,
                        desired_keys=None if signer is None else Keyring([signer.public_key]))
        publisher = DesiredPublisher(store, ingest.publish, settings.prefix, signer=signer)
        api = Api(store, publisher, ingest.stats, policy=settings.health,
                  db_url=settings.db_url, broker_online=lambda: ingest.online,
                  max_body=settings.max_body, hosts=settings.accepted_hosts,
                  token=settings.api_token)
        runner = web.AppRunner(make_app(api), access_log=None, handle_signals=False)
        await runner.setup()
        try:
            site = web.TCPSite(runner, settings.http_host, settings.http_port)
            try:
                await site.start()
            except OSError as exc:
                raise ConfigError(f"--http {settings.http_host}:{settings.http_port}:"
                                  f" cannot listen: {exc.strerror or exc}") from exc
            log.info("registry on http://%s:%d, db %s, broker %s:%d", settings.http_host,
                     settings.http_port, db_url_for_humans(settings.db_url),
                     settings.broker_host, settings.broker_port)
            if not settings.api_token:
                log.log(logging.WARNING if settings.insecure_no_token else logging.INFO,
                        "HTTP API without a token (no --api-token-file): whoever reaches"
                        " %s can change every node's desired state", settings.http_address)
            async with asyncio.TaskGroup() as tg:
                ingesting = tg.create_task(ingest.run())
                resending = tg.create_task(publisher.run())
                await stop.wait()
                log.info("stopping")
                ingesting.cancel()
                resending.cancel()
        finally:
            await runner.cleanup()
    finally:
        await store.close()


def run_registry(settings: RegistrySettings) -> None:
    """Run the server on a fresh event loop until SIGTERM or SIGINT."""
    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await serve(settings, stop)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(Exception):
                    loop.remove_signal_handler(sig)

    asyncio.run(main())
