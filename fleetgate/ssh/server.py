"""The SSH front's listeners: asyncssh acceptors creating a FrontConnection per client.

A reload updates the acceptors' options (asyncssh's SSHAcceptor.update), so new
connections get the reloaded algorithms and host keys while live ones keep theirs and
the listening sockets are never reopened.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

import asyncssh

from ..config import Config
from ..routing import Router
from . import algorithms
from .context import FrontContext
from .front import FrontConnection

log = logging.getLogger(__name__)


class Gateway(FrontContext):
    """The shared front context plus the listeners that feed it connections."""

    def __init__(self, *args: Any, **kwargs: Any):
        self._servers: list[asyncssh.SSHAcceptor] = []
        self.ports: list[int] = []
        self.inherited_sockets: list[socket.socket] = []
        super().__init__(*args, **kwargs)

    def _options(self, config: Config) -> dict[str, Any]:
        """What may change on a reload: host keys and algorithms."""
        g = config.gateway
        return {"server_host_keys": [asyncssh.read_private_key(str(p)) for p in g.host_keys],
                "keepalive_interval": g.keepalive_interval, **algorithms.front_options(g)}

    @staticmethod
    def _fixed_options() -> dict[str, Any]:
        """What never changes: asyncssh options every acceptor is created with."""
        # Our GraceClock bounds pre-auth time (asyncssh's timer per connection would
        # leave a cancelled timer behind each); a verified client waiting for a boot
        # is bounded by the machine's boot_timeout instead.
        return dict(login_timeout=0, keepalive_count_max=3,
                    line_editor=False, encoding=None, allow_pty=True, agent_forwarding=True,
                    x11_forwarding=False, password_auth=True, kbdint_auth=False, gss_host=None,
                    host_based_auth=False)

    def prepare(self, config: Config, router: Router) -> dict:
        """Also read the host keys and build the acceptors' options (asyncssh validates them
        here), so that a reload that fails does so before anything changed."""
        new = super().prepare(config, router)
        options = self._options(config)
        asyncssh.SSHServerConnectionOptions(**self._fixed_options(), **options)
        new["server_options"] = options
        return new

    def commit(self, new: dict) -> None:
        super().commit(new)
        algorithms.apply(new["config"].gateway)  # the KEXINIT policy for the next connections
        for server in self._servers:  # the options were validated in prepare(): update cannot fail
            server.update(**new["server_options"])

    async def start(self) -> None:
        """asyncio side: open every listener and the grace sweeper."""
        self.tasks.spawn(self.grace.run)
        # systemd socket activation hands us the listening sockets; otherwise we open our own.
        places = [{"sock": sock} for sock in self.inherited_sockets] or \
                 [{"host": hp.host, "port": hp.port} for hp in self.config.gateway.listen]
        for place in places:
            server = await asyncssh.create_server(
                lambda: FrontConnection(self), **place, **self._options(self.config),
                **self._fixed_options(), backlog=1024, **({} if "sock" in place else {"reuse_address": True}),
            )
            self._servers.append(server)
            for sock in server.sockets:
                self.ports.append(sock.getsockname()[1])
        log.info("ssh listening ports=%s", self.ports)

    def stop_listening(self) -> None:
        for server in self._servers:
            server.close()

    async def close(self) -> None:
        self.tasks.cancel_all()
        self.stop_listening()
        for c in list(self.connections):
            c.close()
        for server in self._servers:
            await server.wait_closed()
        for c in list(self.connections):
            if c.conn is not None:
                await c.conn.wait_closed()
