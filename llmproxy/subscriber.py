"""
The txredisapi subscriber connection behind
L{llmproxy.pubsub.RedisInvalidationBridge}. Imported when the bridge
starts, so a daemon that uses no Redis never loads txredisapi.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import txredisapi

if TYPE_CHECKING:
    from llmproxy.pubsub import RedisInvalidationBridge


class Subscriber(txredisapi.SubscriberProtocol):
    def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
        self.factory.bridge.message_received(message)


class SubscriberFactory(txredisapi.SubscriberFactory):
    protocol = Subscriber
    initialDelay = 0.2
    maxDelay = 2.0

    def __init__(self, bridge: RedisInvalidationBridge, password: str | None) -> None:
        super().__init__(isLazy=True)
        self.bridge = bridge
        self.password = password
        self.reconnect = True

    def addConnection(self, conn: Any) -> None:
        super().addConnection(conn)
        if conn in self.pool:
            self.bridge.subscriber_connected(conn)

    def delConnection(self, conn: Any) -> None:
        super().delConnection(conn)
        self.bridge.subscriber_lost()
