"""One consumer per socket, ``group_send`` to a group, ``self.send`` per message: the Channels tutorial."""

from channels.generic.websocket import AsyncWebsocketConsumer

GROUP = "bench"


class BroadcastConsumer(AsyncWebsocketConsumer):
    async def connect(self):
        await self.channel_layer.group_add(GROUP, self.channel_name)
        offered = self.scope.get("subprotocols") or []
        await self.accept("notifications.v2" if "notifications.v2" in offered else None)

    async def disconnect(self, code):
        await self.channel_layer.group_discard(GROUP, self.channel_name)

    async def bench_message(self, event):
        await self.send(text_data=event["text"])
