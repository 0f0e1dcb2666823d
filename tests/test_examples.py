"""The documented pattern for "when my model changes, notify users" (examples/services.py)."""

import pytest
from asgiref.sync import sync_to_async
from django.db import transaction

from examples.models import Order
from examples.services import order_place, order_ship

pytestmark = [pytest.mark.django_db(transaction=True)]


async def test_placing_an_order_notifies_the_customer_live(layer, ws, alice, alice_token):
    comm, _ = await ws(alice_token)
    order = await sync_to_async(order_place)(customer=alice, item="Blue mug")
    frame = await comm.receive_json_from(timeout=5)
    assert (frame["title"], frame["data"], frame["link"]) == (
        f"Order #{order.pk} placed", {"order_id": order.pk, "status": "placed"}, f"/orders/{order.pk}/"
    )
    await sync_to_async(order_ship)(order=order)
    frame = await comm.receive_json_from(timeout=5)
    assert (frame["title"], frame["level"], frame["data"]) == (
        f"Order #{order.pk} shipped", "success", {"order_id": order.pk, "status": "shipped"}
    )


async def test_a_rolled_back_model_change_stores_and_pushes_nothing(layer, ws, alice, alice_token):
    comm, _ = await ws(alice_token)

    def place_then_fail():
        with pytest.raises(RuntimeError), transaction.atomic():
            order_place(customer=alice, item="Never")
            raise RuntimeError("payment failed")

    await sync_to_async(place_then_fail)()
    assert await comm.receive_nothing(timeout=0.3)
    assert not await sync_to_async(Order.objects.exists)()
    assert not await sync_to_async(alice.notifications.exists)()
