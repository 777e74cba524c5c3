"""The composition root: one node = one asyncio loop running the receive, queue and
delivery services over one store.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import uuid

from mailgate.clock import Clock, SystemClock
from mailgate.deliver.mx import Resolver
from mailgate.directory import OrganizationCache
from mailgate.queue.delivery import Deliverers
from mailgate.queue.manager import QueueManager
from mailgate.queue.notices import Notices
from mailgate.receive.backpressure import DiskSpace
from mailgate.receive.pickup import PickupDirectory
from mailgate.receive.replay import ReplayDirectory
from mailgate.receive.smtp_listener import SmtpService
from mailgate.receive.submit import Submitter
from mailgate.rlimits import DescriptorExhaustion
from mailgate.settings import NodeSettings, host_name
from mailgate.store import Store, open_store
from mailgate.tracking_log import TrackingLogService

log = logging.getLogger(__name__)


class Node:
    def __init__(self, settings: NodeSettings, *, clock: Clock | None = None,
                 store: Store | None = None, hostname: str | None = None,
                 resolver: Resolver | None = None) -> None:
        """`resolver`: DNS for Send connectors (injected in tests; default dnspython)."""
        self.settings = settings
        self.clock = clock or SystemClock()
        self.store = store or open_store(settings.store_url, settings.node_name, self.clock)
        self.hostname = hostname or host_name(settings.node_name)
        self.owner = f"{settings.node_name}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
        self.orgs = OrganizationCache(self.store, settings.node_name)
        self.submitter = Submitter(settings.node_name, self.hostname)
        self.deliverers = Deliverers(self.store, self.submitter, self.clock,
                                     settings.data_dir, self.hostname, resolver)
        self.notices = Notices(self.store, self.submitter, self.clock, self.hostname)
        self.queues = QueueManager(self.store, self.orgs, self.deliverers, self.clock,
                                   self.owner, notices=self.notices)
        self.disk = DiskSpace(settings.data_dir)
        self.pickup = PickupDirectory(self.store, self.orgs, self.submitter, self.clock,
                                      settings.data_dir, self.hostname,
                                      on_submitted=self.queues.wake, disk=self.disk)
        self.replay = ReplayDirectory(self.store, self.orgs, self.submitter, self.clock,
                                      settings.data_dir, self.hostname,
                                      on_submitted=self.queues.wake, disk=self.disk)
        self.smtp = SmtpService(self.store, self.orgs, self.submitter, self.clock,
                                settings.data_dir, self.hostname, on_submitted=self.queues.wake,
                                disk=self.disk)
        self.tracking_log = TrackingLogService(self.store, self.orgs, settings.data_dir,
                                               self.clock)
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    def dump_tasks(self) -> None:
        """Log every asyncio task with the stack it is suspended in."""
        import io

        for task in asyncio.all_tasks():
            out = io.StringIO()
            task.print_stack(limit=20, file=out)
            log.warning("task %s:\n%s", task.get_name(), out.getvalue())

    async def run(self) -> None:
        """Run until stop() or SIGTERM/SIGINT."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self.stop)
            except (NotImplementedError, RuntimeError):
                pass
        try:
            # kill -USR1 <pid>: log what every task is waiting for (a diagnostic aid).
            loop.add_signal_handler(signal.SIGUSR1, self.dump_tasks)
        except (NotImplementedError, RuntimeError, ValueError):
            pass
        # A read lease on a Pickup file is broken by a writer's open with SIGIO, whose
        # default action would end the process; the lease is only held for a moment.
        try:
            signal.signal(signal.SIGIO, signal.SIG_IGN)
        except (ValueError, AttributeError):
            pass
        loop.set_exception_handler(DescriptorExhaustion())
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        org = await self.orgs.get()
        log.info("node %s started (store %s, organization version %d)",
                 self.settings.node_name, self.settings.store_url, org.version)
        tasks = [asyncio.create_task(self.queues.run(), name="queues"),
                 asyncio.create_task(self.pickup.run(), name="pickup"),
                 asyncio.create_task(self.replay.run(), name="replay"),
                 asyncio.create_task(self.smtp.run(), name="smtp"),
                 asyncio.create_task(self.deliverers.confirmations.run(self.orgs),
                                     name="confirmations"),
                 asyncio.create_task(self.tracking_log.run(), name="tracking-log-service")]
        stopper = asyncio.create_task(self._stop.wait(), name="stop")
        try:
            done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is not stopper and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            stopper.cancel()
            await self.store.close()
            log.info("node %s stopped", self.settings.node_name)
